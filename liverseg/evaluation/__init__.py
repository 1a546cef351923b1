"""Evaluation: overlap and surface metrics, lesions, the per-case report, folder evaluation."""
