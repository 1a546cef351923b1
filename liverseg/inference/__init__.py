"""Inference: settings, whole-volume sliding-window prediction, post-processing, many files."""
