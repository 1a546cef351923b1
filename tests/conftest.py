"""Shared fixtures. The real CT lives in ../shared/fixtures (never copied into the project)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
