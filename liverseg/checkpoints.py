"""Checkpoints that load with ``torch.load(weights_only=True)`` and survive a kill mid-write.

A checkpoint holds only tensors and plain Python values: model, optimizer and scaler states,
epoch, best metric, RNG states, the resolved config (with its preprocessing) and the package
version, so inference can rebuild everything from it alone.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from liverseg import __version__
from liverseg.errors import CheckpointError
from liverseg.files import atomic_path

REQUIRED_KEYS = ("model", "config", "preprocessing", "epoch")


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, **contents) -> Path:
    """Write a checkpoint atomically (temp file, then rename); adds the package version."""
    with atomic_path(path) as tmp:
        torch.save({**contents, "version": __version__}, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a liverseg checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: Missing file, a file that is not a torch checkpoint (truncated,
            corrupted), or a checkpoint without liverseg's keys; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a broken file
        reason = type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a torch checkpoint ({reason}); "
            "delete it, or resume from another one (checkpoints/best.pt)"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} is not a liverseg checkpoint (not a dict)")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a liverseg checkpoint: missing key(s) {', '.join(missing)}"
        )
    return checkpoint
