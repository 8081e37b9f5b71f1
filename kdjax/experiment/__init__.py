"""The experiment: the config schema, the typed settings built from it (its only reader), the stages and the
provenance records of their outputs."""
