"""liverseg: liver and liver-tumor segmentation in 3D abdominal CT."""

__version__ = "0.1.0"
