"""Per-token decomposition and training-data attribution (neighbourhood, influence, baselines)."""
