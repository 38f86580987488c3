"""dpvit: a Vision Transformer in plain numpy, trained data-parallel over MPI."""

__version__ = "0.1.0"
