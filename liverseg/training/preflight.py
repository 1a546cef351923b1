"""What ``fit()`` checks before it spends time: the config, the dataset, the run to resume.

Each check raises with what was expected, what was found and how to fix it: config values that
would only fail after the dataset check and cache build (:func:`check_config`), the dataset at
``data.root`` with every problem gathered (:func:`find_training_cases`), and a last checkpoint whose
model/data config differs from the current one (:func:`resume_state`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from liverseg.checkpoints import load_checkpoint
from liverseg.config import Config, diff_configs, to_dict
from liverseg.data.cases import Case, check_dataset, find_cases
from liverseg.data.problems import raise_for_errors
from liverseg.devices import AMP_MODES
from liverseg.errors import ConfigError, DataError, LiversegError, TrainingError
from liverseg.model import NORMS
from liverseg.training.losses import LOSSES
from liverseg.training.lr_schedules import LR_SCHEDULES

log = logging.getLogger(__name__)

# Data keys that may change between a run and its resume: where the data are and how fast they
# are served, not what the model learns from.
RESUMABLE_CHANGES = ("root", "cache_dir", "num_workers", "queue_length")


def _without(section: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in section.items() if k not in keys}


def check_config(config: Config) -> None:
    """Refuse settings that would only fail after the dataset check and cache build.

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    data, model = config.data, config.model
    problems = []
    if not data.hu_max > data.hu_min:
        problems.append(f"data.hu_max ({data.hu_max}) must exceed data.hu_min ({data.hu_min})")
    if config.train.loss not in LOSSES:
        problems.append(f"train.loss={config.train.loss!r}: choose one of {', '.join(LOSSES)}")
    if model.norm not in NORMS:
        problems.append(f"model.norm={model.norm!r}: choose one of {', '.join(NORMS)}")
    if config.train.lr_schedule not in LR_SCHEDULES:
        problems.append(
            f"train.lr_schedule={config.train.lr_schedule!r}: choose one of "
            + ", ".join(LR_SCHEDULES)
        )
    if config.train.amp not in AMP_MODES:
        problems.append(f"train.amp={config.train.amp!r}: choose one of {', '.join(AMP_MODES)}")
    if not 0 <= model.deep_supervision <= len(model.features) - 2:
        problems.append(
            f"model.deep_supervision={model.deep_supervision} must be in "
            f"[0, {max(len(model.features) - 2, 0)}] for model.features={list(model.features)}"
        )
    multiple = 2 ** (len(model.features) - 1)
    if len(model.features) < 2 or data.patch_size % multiple:
        problems.append(
            f"data.patch_size={data.patch_size} must be a multiple of {multiple} for "
            f"model.features={list(model.features)}"
        )
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


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
    """The checkpoint to continue from, or None; refuses a model/data config that changed."""
    if config.train.resume == "never" or not last.exists():
        return None
    if config.train.resume != "auto":
        raise LiversegError(f"train.resume must be auto or never, got {config.train.resume!r}")
    checkpoint = load_checkpoint(last)
    saved, current = checkpoint["config"], to_dict(config)
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
