"""dpfl: federated learning with user-level differential privacy for PyTorch, built on Flower."""

__version__ = "0.1.0"
