"""Plans: TPU chips and topologies, XLA cost analysis with loop trip counts, the engine's and the train step's
per-device memory and predicted throughput."""
