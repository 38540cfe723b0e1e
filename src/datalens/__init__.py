"""datalens: predictive data attribution (datamodels, TRAK) on reproducible pipelines."""

__version__ = "0.1.0"
