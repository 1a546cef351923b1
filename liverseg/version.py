"""The package version, recorded in checkpoints and reports."""

__version__ = "0.1.0"
