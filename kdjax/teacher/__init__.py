"""The teacher: priming strategies and prompts, the top-k store, and the store's producer on kdjax's engine."""
