"""Datasets on disk: finding a Task03 folder's cases, the data doctor, splits, halving."""
