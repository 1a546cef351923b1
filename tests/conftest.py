"""Shared fixtures. The real CT lives in ../shared/fixtures (never copied into the project)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from liverseg.checkpoints import preprocessing_record
from liverseg.config import Config, DataConfig, ModelConfig, to_dict
from liverseg.model import UNet3D

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture
def real_ct() -> tuple[Path, Path]:
    """(image, liver mask) of the real abdominal CT; skips where shared/fixtures is absent."""
    image = SHARED_FIXTURES / "real_ct_sm.nii.gz"
    mask = SHARED_FIXTURES / "real_ct_sm_liver.nii.gz"
    if not image.is_file() or not mask.is_file():
        pytest.skip(f"real CT fixture not found under {SHARED_FIXTURES}")
    return image, mask


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_tiny_checkpoint(
    path: Path,
    *,
    factor: int = 2,
    features: tuple[int, ...] = (4, 8),
    model: torch.nn.Module | None = None,
    epoch: int = 1,
) -> Path:
    """An untrained UNet3D saved as training saves it: 16^3 patches, HU window -150..250.

    Args:
        path: Where to write the ``.pt``.
        factor: The reduction the "training data" had (``data.factor``).
        features: ``model.features`` of the config.
        model: Weights to save; default a fresh seeded ``UNet3D(1, 2, features)``.
        epoch: The checkpoint's epoch.
    """
    config = Config(data=DataConfig(patch_size=16, factor=factor), model=ModelConfig(features))
    if model is None:
        torch.manual_seed(0)
        model = UNet3D(1, 2, features=features)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {},
            "epoch": epoch,
            "best_metric": 0.5,
            "config": to_dict(config),
            "preprocessing": preprocessing_record(-150, 250, factor, "regions"),
            "version": "0.1.0",
        },
        path,
    )
    return Path(path)


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """:func:`write_tiny_checkpoint` at ``tmp_path/best.pt`` (factor 2, epoch 1)."""
    return write_tiny_checkpoint(tmp_path / "best.pt")
