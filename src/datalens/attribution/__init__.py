"""Layer 3: attribution methods: datamodels, TRAK (with its projection) and the baselines."""
