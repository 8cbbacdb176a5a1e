"""datp: video action recognition with learned temporal pooling."""

__version__ = "0.1.0"
