"""The tiny training run the training tests share: its phantoms and its overrides.

A plain module, not a second ``conftest.py`` (one here would shadow ``tests/conftest.py``, which
tests import helpers from); each test module wraps :func:`write_phantoms` in its fixture.
"""

from __future__ import annotations

from liverseg.phantoms import write_dataset


def write_phantoms(tmp_path_factory):
    """Four labeled phantoms of 40 x 40 x 32 in the Task03 layout; their root."""
    root = tmp_path_factory.mktemp("phantoms") / "data"
    write_dataset(root, cases=4, shape=(40, 40, 32), seed=0, test_cases=0)
    return root


def tiny_overrides(root, run_dir, *extra, epochs: int = 2):
    """Three training cases of 40x40x32, two 16^3 patches each, a two-level UNet."""
    return (
        f"data.root={root}",
        f"run.dir={run_dir}",
        "data.num_train=3",
        "data.factor=1",
        "data.shape=[40, 40, 32]",
        "data.patch_size=16",
        "data.num_workers=0",
        "data.queue_length=6",
        "data.samples_per_volume=2",
        "model.features=[4, 8]",
        f"train.epochs={epochs}",
        "train.val_every=1",
        "inference.batch_size=8",
        *extra,
    )
