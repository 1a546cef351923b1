"""Checkpoints that load with ``torch.load(weights_only=True)`` and survive a kill mid-write.

A checkpoint holds only tensors and plain Python values: model, optimizer and scaler states,
epoch, best metric, RNG states, the resolved config (with its preprocessing), the metrics rows so
far, how many processes trained it, and the package version. The model is always the plain
model, never its DistributedDataParallel wrapper: a checkpoint of a torchrun run loads in one
process, and resumes there or under torchrun with another number of processes.
:func:`training_state` gathers all but the version, which :func:`save_checkpoint` adds; a
resumed run gets its states back with :func:`restore_training_state` (and its metrics rows with
:func:`saved_history`), and inference rebuilds model and settings from the checkpoint alone with
:func:`load_model`.
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from liverseg.config import Config, from_dict, to_dict
from liverseg.constants import HEADS
from liverseg.devices import resolve_device
from liverseg.errors import CheckpointError, ConfigError, LiversegError
from liverseg.inference.postprocess import Postprocess
from liverseg.inference.settings import RUN_FIELDS, InferenceSettings, spacing_problems
from liverseg.io import atomic_path
from liverseg.labels import head_for_loss, out_channels
from liverseg.model import UNet3D
from liverseg.version import __version__
from liverseg.writable import UnwritableError, unwritable

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "config", "preprocessing", "epoch")
PREPROCESSING_KEYS = ("hu_min", "hu_max", "factor", "head")
# "X.Y" or "X.Y.Z", with anything after it (".dev1", "+local") ignored.
_RELEASE = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")


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
    """Write a checkpoint atomically (temp file, then rename); adds the package version.

    Raises:
        UnwritableError: The disk is full or the folder cannot be written; the file already at
            ``path`` (the last good checkpoint) is left as it was.
    """
    try:
        # Through a Python file a full disk is an OSError with its errno; torch.save(path) would
        # raise an opaque RuntimeError from its C++ writer instead.
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save({**contents, "version": __version__}, handle)
    except OSError as exc:
        error = unwritable(path, exc, "checkpoint")
        raise UnwritableError(
            f"{error} (any earlier {Path(path).name} there is left as it was)", path
        ) from None
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a liverseg checkpoint with ``weights_only=True``.

    A checkpoint of a newer major or minor liverseg release is refused (its contents may mean
    something this version does not know); one of a newer patch release loads with a warning;
    one of an older release loads.

    Raises:
        CheckpointError: Missing file, a folder, a file that is not a torch checkpoint
            (truncated, corrupted), a checkpoint without liverseg's keys, or one written by a
            newer liverseg major/minor release; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(_folder_message(path))
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
    _check_version(path, checkpoint.get("version"))
    return checkpoint


def _folder_message(path: Path) -> str:
    """What to say when ``--checkpoint`` names a folder: the ``.pt`` files it holds, if any."""
    found = sorted({*path.glob("*.pt"), *path.glob("checkpoints/*.pt")})
    if not found:
        return (
            f"checkpoint {path} is a folder and holds no .pt file; give a .pt file such as "
            f"{path / 'checkpoints' / 'best.pt'} (a run folder keeps its checkpoints there)"
        )
    shown = ", ".join(str(p) for p in found[:6]) + (", ..." if len(found) > 6 else "")
    best = path / "checkpoints" / "best.pt"
    return (
        f"checkpoint {path} is a folder; give a .pt file such as "
        f"{best if best in found else found[0]} (it holds {shown})"
    )


def _release(version: object) -> tuple[int, int, int] | None:
    """``(major, minor, patch)`` of a version string, or None when it is not ``X.Y[.Z]...``."""
    match = _RELEASE.match(version) if isinstance(version, str) else None
    return tuple(int(part or 0) for part in match.groups()) if match else None


def _check_version(path: Path, version: object) -> None:
    """Refuse a checkpoint of a newer major/minor release; warn for a newer patch release."""
    saved, current = _release(version), _release(__version__)
    if saved is None or current is None:
        log.warning(
            "checkpoint %s records no readable liverseg version (%r); loading it with %s",
            path, version, __version__,
        )  # fmt: skip
    elif saved[:2] > current[:2]:
        raise CheckpointError(
            f"checkpoint {path} was written by liverseg {version}, newer than this liverseg "
            f"{__version__}; upgrade liverseg to {saved[0]}.{saved[1]} or later to use it"
        )
    elif saved > current:
        log.warning(
            "checkpoint %s was written by liverseg %s, a newer patch release than this %s; "
            "loading it (patch releases keep the checkpoint format)",
            path, version, __version__,
        )  # fmt: skip


def restore_training_state(checkpoint: dict, model, optimizer, scaler) -> None:
    """Load a resumed run's model, optimizer, scaler and RNG states from its checkpoint."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])


def training_state(
    model,
    optimizer,
    scaler,
    epoch: int,
    best_metric: float,
    config: Config,
    preprocessing: dict,
    history: list[dict] | None = None,
    world_size: int = 1,
) -> dict:
    """What a checkpoint holds: tensors and plain values only.

    ``history`` is the run's ``metrics.csv`` rows up to ``epoch`` (plain dicts of text): a resumed
    run takes them back when the file was lost or damaged (:func:`saved_history`).
    ``world_size`` is how many processes trained it (:func:`saved_world_size`); ``model`` must
    be the plain model, not its DistributedDataParallel wrapper.
    """
    return dict(
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        epoch=epoch,
        best_metric=best_metric,
        rng=rng_state(),
        config=to_dict(config),
        preprocessing=preprocessing,
        history=[{str(k): str(v) for k, v in row.items()} for row in history or []],
        world_size=int(world_size),
    )


def saved_world_size(checkpoint: dict) -> int:
    """How many processes trained a checkpoint; 1 for one written before this was recorded."""
    value = checkpoint.get("world_size", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def saved_history(checkpoint: dict) -> list[dict[str, str]] | None:
    """The ``metrics.csv`` rows a checkpoint was saved with; None when it holds none.

    Checkpoints written before the history was stored carry none; neither does a damaged one
    whose ``history`` is not a list of dicts.
    """
    history = checkpoint.get("history")
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        return None
    return [{str(k): str(v) for k, v in row.items()} for row in history]


def build_model(config: Config, head: str | None = None) -> UNet3D:
    """The UNet3D of ``config.model``, for training and for loading a checkpoint alike.

    Args:
        config: The run's config.
        head: ``"regions"`` or ``"softmax"``; None: the head of ``config.train.loss``.
    """
    head = head_for_loss(config.train.loss) if head is None else head
    return UNet3D(
        in_channels=1,
        out_channels=out_channels(head),
        features=config.model.features,
        norm=config.model.norm,
        dropout=config.model.dropout,
        deep_supervision=config.model.deep_supervision,
    )


def preprocessing_record(
    hu_min: float,
    hu_max: float,
    factor: int,
    head: str,
    spacing_mm: tuple[float, float, float] | None = None,
) -> dict:
    """The plain dict a checkpoint carries so inference can rebuild preprocessing alone.

    Args:
        hu_min: Lower end of the HU window.
        hu_max: Upper end of the HU window.
        factor: Reduction of the training data relative to the original scans (1: none).
        head: Output decoding, ``"regions"`` or ``"softmax"`` (:mod:`liverseg.labels`).
        spacing_mm: The target spacing the training data were resampled to (canonical RAS
            order), or None. Checkpoints written before it existed lack the key: None.
    """
    return {
        "hu_min": float(hu_min),
        "hu_max": float(hu_max),
        "factor": int(factor),
        "head": head,
        "spacing_mm": None if spacing_mm is None else [float(v) for v in spacing_mm],
    }


def inference_settings(
    config: Config, preprocessing: dict, provenance: dict | None = None
) -> InferenceSettings:
    """THE mapping of a run's config and preprocessing record to inference settings.

    Training's validation and :func:`load_model` both call it, so the settings a run validated
    with are the ones ``liverseg predict`` uses.

    Args:
        config: The run's config (its ``inference`` section and ``data.patch_size``).
        preprocessing: :func:`preprocessing_record`'s dict (HU window, factor, head, spacing).
        provenance: Which checkpoint (path, epoch, version), recorded in reports.
    """
    inference = config.inference
    return InferenceSettings(
        hu_min=float(preprocessing["hu_min"]),
        hu_max=float(preprocessing["hu_max"]),
        head=str(preprocessing["head"]),
        factor=int(preprocessing["factor"]),
        spacing_mm=preprocessing.get("spacing_mm"),
        patch_size=int(config.data.patch_size),
        overlap=inference.overlap,
        batch_size=inference.batch_size,
        blending=inference.blending,
        amp=inference.amp,
        tta_flips=inference.tta_flips,
        skip_air_windows=inference.skip_air_windows,
        crop_to_body=inference.crop_to_body,
        postprocess=Postprocess(
            keep_largest_liver=inference.keep_largest_liver,
            tumor_inside_liver=inference.tumor_inside_liver,
            min_tumor_mm3=inference.min_tumor_mm3,
        ),
        provenance=provenance,
    )


def _preprocessing_problems(preprocessing: dict) -> list[str]:
    """What is wrong with a checkpoint's HU window, head and factor (empty when nothing)."""
    problems = []
    for key in ("hu_min", "hu_max"):
        value = preprocessing[key]
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not real or not math.isfinite(value):
            problems.append(f"{key}={value!r} (expected a finite number of HU)")
    if not problems and not preprocessing["hu_max"] > preprocessing["hu_min"]:
        problems.append(
            f"hu_max={preprocessing['hu_max']!r} does not exceed hu_min={preprocessing['hu_min']!r}"
        )
    if preprocessing["head"] not in HEADS:
        problems.append(f"head={preprocessing['head']!r} (expected one of {', '.join(HEADS)})")
    factor = preprocessing["factor"]
    if not isinstance(factor, numbers.Integral) or isinstance(factor, bool) or factor < 1:
        problems.append(f"factor={factor!r} (expected an integer >= 1)")
    problems += spacing_problems(preprocessing.get("spacing_mm"))
    return problems


def load_model(
    checkpoint: str | Path, device: str | torch.device = "auto"
) -> tuple[UNet3D, InferenceSettings]:
    """Rebuild the model and its inference settings from a checkpoint alone.

    Args:
        checkpoint: A ``.pt`` file written by ``liverseg train``.
        device: Where to put the model (see :func:`liverseg.devices.resolve_device`).

    Returns:
        The model in eval mode, and its :class:`~liverseg.inference.settings.InferenceSettings`
        (the checkpoint's HU window, factor and head, the run's patch size and inference
        section; ``provenance``: the checkpoint's path, epoch and the liverseg version that
        trained it).

    Raises:
        CheckpointError: Missing, corrupted or non-liverseg file, a folder, a newer liverseg
            release's checkpoint (see :func:`load_checkpoint`), a non-finite or inverted HU
            window, an unknown head or a factor below 1, or weights that do not fit the model
            its config describes; the message names the file and the problem.
    """
    path = Path(checkpoint)
    state = load_checkpoint(path, map_location="cpu")
    try:
        config = from_dict(state["config"], source=f"checkpoint {path}")
    except (ConfigError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} holds a config this version of liverseg cannot read ({exc}); "
            "predict with the liverseg version that trained it"
        ) from None
    preprocessing = state["preprocessing"]
    missing = [
        k
        for k in PREPROCESSING_KEYS
        if not isinstance(preprocessing, dict) or k not in preprocessing
    ]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a liverseg checkpoint: preprocessing lacks "
            f"{', '.join(missing)}"
        )
    problems = _preprocessing_problems(preprocessing)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} holds invalid preprocessing: {'; '.join(problems)}; the file "
            "was edited or damaged: use a checkpoint written by liverseg train"
        )
    try:
        model = build_model(config, preprocessing["head"])
        model.load_state_dict(state["model"])
        settings = inference_settings(
            config,
            preprocessing,
            provenance={
                "checkpoint": str(path),
                "epoch": int(state["epoch"]),
                "liverseg_version": str(state.get("version", "unknown")),
            },
        )
    except (ValueError, RuntimeError, TypeError, AttributeError, LiversegError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path}: the weights or settings do not fit the model its config "
            f"describes ({reason})"
        ) from None
    device = resolve_device(device)
    model.eval().to(device)
    log.info("loaded %s (epoch %s) on %s", path, state.get("epoch"), device)
    return model, settings


# The config key behind each setting an ensemble's checkpoints must share (errors name it).
_SETTING_KEYS = {
    "hu_min": "data.hu_min",
    "hu_max": "data.hu_max",
    "head": "head (from train.loss)",
    "factor": "data.factor",
    "spacing_mm": "data.spacing_mm",
    "patch_size": "data.patch_size",
}


def load_models(
    checkpoints: Sequence[str | Path], device: str | torch.device = "auto"
) -> tuple[list[UNet3D], InferenceSettings]:
    """Rebuild an ensemble (e.g. the folds of a cross-validation) from its checkpoints alone.

    Args:
        checkpoints: One or more ``.pt`` files written by ``liverseg train``.
        device: Where to put the models (see :func:`liverseg.devices.resolve_device`).

    Returns:
        The models in eval mode, and the settings they share: what defines a model's input and
        output (HU window, head, factor, spacing, patch size) is the same for all; how the
        sliding window runs (:data:`~liverseg.inference.settings.RUN_FIELDS`) is the first
        checkpoint's. With several checkpoints, ``provenance`` is ``{"ensemble": [the
        provenance of each, in order]}``; with one, it is :func:`load_model`'s.

    Raises:
        CheckpointError: No checkpoint, one that :func:`load_model` refuses, or two that differ
            in a setting that defines the input or output; the message names both files and
            the key.
    """
    paths = [Path(c) for c in checkpoints]
    if not paths:
        raise CheckpointError("no checkpoint given; pass one or more .pt files")
    models, all_settings = [], []
    for path in paths:
        model, settings = load_model(path, device)
        differences = all_settings[0].model_differences(settings) if all_settings else []
        if differences:
            name, first, other = differences[0]
            raise CheckpointError(
                f"checkpoints {paths[0]} and {path} differ in {_SETTING_KEYS.get(name, name)} "
                f"({first!r} and {other!r}): the models of an ensemble must see the same input "
                "and give the same output; combine checkpoints trained with one configuration"
            )
        models.append(model)
        all_settings.append(settings)
    settings = all_settings[0]
    for other in all_settings[1:]:
        changed = [
            f for f in RUN_FIELDS if f != "provenance" and getattr(other, f) != getattr(settings, f)
        ]
        if changed:
            log.info(
                "%s differs from %s in %s; using the first checkpoint's",
                other.provenance["checkpoint"], paths[0], ", ".join(changed),
            )  # fmt: skip
    if len(paths) > 1:
        settings = settings.replace(provenance={"ensemble": [s.provenance for s in all_settings]})
    return models, settings
