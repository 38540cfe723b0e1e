"""Layer 4: metrics that judge any scores (LDS, correlations, the noise ceiling); no method is imported here."""
