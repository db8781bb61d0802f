"""fmray: train, align, tune and serve foundation models on Ray."""

__version__ = "0.1.0"
