"""What ``fit()`` checks before it spends time: the run folder, the dataset, the run to resume.

Each check raises with what was expected, what was found and how to fix it: a ``run.dir`` that
cannot be written (:func:`check_run_writable`), the dataset at ``data.root`` with every problem
gathered (:func:`find_training_cases`), a last checkpoint whose model/data config differs
from the current one (:func:`resume_state`), and more torchrun processes than training cases
(:func:`check_world_size`). The config's own values were checked when it was
built (:func:`liverseg.config.check_config`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from liverseg.checkpoints import load_checkpoint
from liverseg.config import Config, diff_configs, to_dict
from liverseg.data.cases import Case, find_cases
from liverseg.data.checks import check_dataset
from liverseg.data.prepare import check_prepared_for_training
from liverseg.data.problems import raise_for_errors
from liverseg.errors import CheckpointError, DataError, TrainingError
from liverseg.writable import check_writable_dir

log = logging.getLogger(__name__)

# What a checkpoint to resume from holds besides load_checkpoint's required keys.
TRAINING_KEYS = ("optimizer", "scaler", "rng", "best_metric")
# Data keys that may change between a run and its resume: where the data are and how fast they
# are served, not what the model learns from.
RESUMABLE_CHANGES = ("root", "cache_dir", "num_workers", "queue_length")


def _without(section: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in section.items() if k not in keys}


def find_training_cases(config: Config) -> list[Case]:
    """Find and check the dataset at ``data.root`` (creating phantoms if the config asks)."""
    root = Path(config.data.root)
    if config.phantoms.cases > 0 and not (root / "imagesTr").is_dir():
        from liverseg.phantoms import write_dataset

        log.info("creating %d phantom cases at %s", config.phantoms.cases, root)
        write_dataset(
            root,
            cases=config.phantoms.cases,
            shape=config.phantoms.shape,
            seed=config.phantoms.seed,
            test_cases=0,
        )
    if not (root / "imagesTr").is_dir():
        raise DataError(
            f"no dataset at data.root={root} (looked for {root / 'imagesTr'}). Get "
            "Task03_Liver.tar from the Medical Segmentation Decathlon, unpack it, halve it "
            f"with `liverseg prepare Task03_Liver {root}`, or point data.root=... at your copy. "
            "To try liverseg on synthetic data instead: python main.py --config configs/demo.yaml"
        )
    check_prepared_for_training(root, config.data.factor, config.data.spacing_mm)
    cases = find_cases(root, split="training")
    if config.phantoms.cases > 0 and len(cases) != config.phantoms.cases:
        raise DataError(
            f"{root} holds {len(cases)} training cases but phantoms.cases={config.phantoms.cases} "
            f"asks for that many phantoms (a folder from another config?): remove {root} to "
            f"create them again, or set phantoms.cases={len(cases)} to use what is there"
        )
    raise_for_errors(
        check_dataset(
            root,
            cases=cases,
            affine_tolerance_mm=config.data.affine_tolerance_mm,
            copy_label_geometry=config.data.copy_label_geometry,
        ),
        root,
    )
    return cases


def resume_state(config: Config, last: Path) -> dict | None:
    """The checkpoint to continue from, or None; refuses a model/data config that changed.

    ``train.resume`` is ``"auto"`` or ``"never"``: the config refuses anything else when it loads.
    """
    if config.train.resume == "never" or not last.exists():
        return None
    checkpoint = load_checkpoint(last)
    saved, current = checkpoint["config"], to_dict(config)
    missing = [key for key in TRAINING_KEYS if key not in checkpoint]
    sections = isinstance(saved, dict) and all(
        isinstance(saved.get(s), dict) for s in ("model", "data", "train")
    )
    if missing or not sections:
        raise CheckpointError(
            f"cannot resume from {last}: it lacks a training run's state "
            f"({', '.join(missing) or 'config sections'}); copy checkpoints/best.pt over it, "
            "delete it to start again, or set train.resume=never"
        )
    changes = [
        line
        for section in ("model", "data")
        for line in diff_configs(
            _without(saved[section], RESUMABLE_CHANGES),
            _without(current[section], RESUMABLE_CHANGES),
            f"{section}.",
        )
    ]
    if saved["train"]["loss"] != current["train"]["loss"]:
        changes.append(f"train.loss: {saved['train']['loss']!r} -> {current['train']['loss']!r}")
    if changes:
        raise TrainingError(
            f"cannot resume from {last}: the model/data config differs from the checkpoint's:\n  "
            + "\n  ".join(changes)
            + "\nuse the same config, set train.resume=never, or choose another run.dir"
        )
    return checkpoint


def check_run_writable(config: Config) -> None:
    """Refuse a ``run.dir`` that cannot be written, before phantoms, cache or training.

    Also ``data.root`` when phantoms are to be written there. A separate ``data.cache_dir`` is
    not probed: a complete cache may be shared read-only.

    Raises:
        UnwritableError: The folder is on a read-only or full disk, lacks permission, or a file
            is in its place; the message names it and the fix.
    """
    check_writable_dir(Path(config.run.dir), "run.dir")
    root = Path(config.data.root)
    if config.phantoms.cases > 0 and not (root / "imagesTr").is_dir():
        check_writable_dir(root, "data.root (where the phantoms are written)")


def check_world_size(train_cases: int, world_size: int) -> None:
    """Refuse more processes than training cases: each rank reads its own share of the cases.

    Raises:
        TrainingError: ``world_size`` exceeds ``train_cases``; the message says both fixes.
    """
    if world_size > train_cases:
        raise TrainingError(
            f"{world_size} processes cannot share {train_cases} training case(s): each process "
            "reads its own share of the cases; start fewer (torchrun --nproc_per_node, "
            "--nnodes) or train on more cases (data.num_train)"
        )
