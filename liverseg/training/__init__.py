"""Training: the cached patch pipeline, losses, the loop, and what it checks before it starts."""
