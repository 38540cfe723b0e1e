"""Layer 0: params, datasets, architectures, seeded sampling, stores, executors and progress. Knows no task."""
