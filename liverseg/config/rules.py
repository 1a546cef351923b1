"""The config's rules: the allowed choices and ranges of its keys, and the keys that must agree.

:func:`check_config` refuses a config that breaks one, before any data is read: a choice outside
:data:`CHOICES` names the nearest choice, a number outside :data:`RANGES` its range, and keys that
do not agree each other. Every message names where the value came from.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from liverseg.config.schema import DEFAULT_SOURCE, Config, get_value, plain_value
from liverseg.constants import (
    AMP_MODES,
    BLENDINGS,
    DEVICE_TYPES,
    LABEL_VALUES,
    LOSSES,
    LR_SCHEDULES,
    NORMS,
    RESUME_MODES,
    TTA_FLIPS,
)
from liverseg.errors import ConfigError

# The allowed values of each choice key (their meanings: liverseg.constants, default.yaml).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.norm": NORMS,
    "train.lr_schedule": LR_SCHEDULES,
    "train.loss": LOSSES,
    "train.amp": AMP_MODES,
    "train.resume": RESUME_MODES,
    "inference.blending": BLENDINGS,
    "inference.amp": AMP_MODES,
}


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric key, or of each of its values for a tuple key."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


_POSITIVE = Bounds(0, low_open=True)
_NON_NEGATIVE = Bounds(0)
_FRACTION = Bounds(0, 1, high_open=True)
_SEED = Bounds(0, 2**32 - 1)
# Numeric keys whose values are limited; a value outside is refused when the config loads.
RANGES: dict[str, Bounds] = {
    "data.num_train": Bounds(1),
    "data.folds": Bounds(2),
    "data.fold": _NON_NEGATIVE,
    "data.factor": Bounds(1),
    "data.shape": Bounds(1),
    "data.patch_size": Bounds(1),
    "data.samples_per_volume": Bounds(1),
    "data.queue_length": Bounds(1),
    "data.batch_size": Bounds(1),
    "data.num_workers": _NON_NEGATIVE,
    "data.scales": _POSITIVE,
    "data.affine_tolerance_mm": _NON_NEGATIVE,
    "model.features": Bounds(1),
    "model.dropout": _FRACTION,
    "train.epochs": Bounds(1),
    "train.lr": _POSITIVE,
    "train.val_every": Bounds(1),
    "train.max_nonfinite": Bounds(1),
    "train.iterations_per_epoch": _NON_NEGATIVE,
    "inference.overlap": _FRACTION,
    "inference.batch_size": Bounds(1),
    "inference.min_tumor_mm3": _NON_NEGATIVE,
    "phantoms.cases": _NON_NEGATIVE,
    "phantoms.shape": Bounds(1),
    # Seeds: numpy's generators take 0 <= seed < 2**32 (a negative one failed at fit's start).
    "data.split_seed": _SEED,
    "train.seed": _SEED,
    "phantoms.seed": _SEED,
    # A rotation of more than half a turn either way is the same as a smaller one.
    "data.degrees": Bounds(-180, 180),
}

# The keys a problem concerns (their sources are named) and what is wrong.
_Problem = tuple[tuple[str, ...], str]


def nearest_hint(value: str, choices: list[str] | tuple[str, ...], cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the choice most like ``value``, or "" if none is alike.

    Args:
        value: What the user wrote (a key or a choice).
        choices: The real keys or choices.
        cutoff: How alike (0 to 1, difflib's ratio) the nearest must be to be named.

    Returns:
        The hint to append to a message, or "".
    """
    nearest = difflib.get_close_matches(str(value), choices, n=1, cutoff=cutoff)
    return f"; did you mean '{nearest[0]}'?" if nearest else ""


def _show(config: Config, key: str) -> str:
    """``key=value`` as the user wrote it (lists, quoted strings)."""
    return f"{key}={plain_value(get_value(config, key))!r}"


def _choice_problems(config: Config) -> Iterator[_Problem]:
    for key, choices in CHOICES.items():
        value = get_value(config, key)
        if value not in choices:
            allowed = ", ".join(choices)
            hint = nearest_hint(value, choices)
            yield (key,), f"{_show(config, key)} is not one of {allowed}{hint}"
    if config.inference.tta_flips not in TTA_FLIPS:
        allowed = ", ".join(map(str, TTA_FLIPS))
        yield (
            ("inference.tta_flips",),
            f"{_show(config, 'inference.tta_flips')} is not one of {allowed}",
        )
    # Whether the device exists is asked when training starts: a checkpoint moves between machines.
    kind, colon, index = config.train.device.partition(":")
    if kind not in DEVICE_TYPES or (colon and (kind == "auto" or not index.isdigit())):
        hint = nearest_hint(kind, DEVICE_TYPES)
        text = f"{_show(config, 'train.device')} is not auto, cpu, cuda, cuda:N or mps{hint}"
        yield ("train.device",), text


def _range_problems(config: Config) -> Iterator[_Problem]:
    for key, bounds in RANGES.items():
        value = get_value(config, key)
        if value is None:  # an optional key left unset (data.folds: no cross-validation)
            continue
        if isinstance(value, tuple):
            if not all(v in bounds for v in value):
                yield (key,), f"{_show(config, key)}: each value must be {bounds}"
        elif value not in bounds:
            yield (key,), f"{_show(config, key)} must be {bounds}"


def _hu_window_problems(config: Config) -> Iterator[_Problem]:
    if not config.data.hu_max > config.data.hu_min:
        yield (
            ("data.hu_min", "data.hu_max"),
            f"{_show(config, 'data.hu_max')} must exceed {_show(config, 'data.hu_min')}",
        )


def _level_problems(config: Config) -> Iterator[_Problem]:
    """The UNet's levels against the patch size and the deep-supervision heads."""
    levels, patch_size = len(config.model.features), config.data.patch_size
    features = _show(config, "model.features")
    if levels < 2:
        yield ("model.features",), f"{features}: at least 2 levels are needed"
    multiple = 2 ** max(levels - 1, 0)
    if levels >= 2 and patch_size >= 1 and patch_size % multiple:
        lower = patch_size // multiple * multiple
        use = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
        yield (
            ("data.patch_size", "model.features"),
            f"{_show(config, 'data.patch_size')} must be a multiple of {multiple} for {features} "
            f"(2 ** (levels - 1)); use {use}",
        )
    if not 0 <= config.model.deep_supervision <= max(levels - 2, 0):
        yield (
            ("model.deep_supervision", "model.features"),
            f"{_show(config, 'model.deep_supervision')} must be in [0, {max(levels - 2, 0)}] for "
            f"{features} (at most levels - 2)",
        )


def _sampling_problems(config: Config) -> Iterator[_Problem]:
    """The label probabilities of the patch sampler, and a split that leaves validation cases."""
    probabilities = config.data.label_probabilities
    if (
        not set(probabilities) <= set(LABEL_VALUES)
        or any(not p >= 0 for p in probabilities.values())
        or not sum(probabilities.values()) > 0
    ):
        yield (
            ("data.label_probabilities",),
            f"{_show(config, 'data.label_probabilities')}: keys must be label values "
            f"{list(LABEL_VALUES)}, values >= 0 and not all 0",
        )
    cases = config.phantoms.cases
    if (
        cases > 0
        and config.data.split_file is None
        and config.data.folds is None
        and not config.data.num_train < cases
    ):
        yield (
            ("data.num_train", "phantoms.cases"),
            f"{_show(config, 'data.num_train')} leaves no validation case of "
            f"phantoms.cases={cases}; set data.num_train between 1 and {cases - 1}",
        )


def _fold_problems(config: Config) -> Iterator[_Problem]:
    """A fold that exists, k folds that each get a validation case, and one way to split."""
    folds, fold = config.data.folds, config.data.fold
    if folds is None:
        if fold != 0:
            yield (
                ("data.fold", "data.folds"),
                f"{_show(config, 'data.fold')} needs data.folds (k-fold cross-validation); set "
                "data.folds=K, or leave data.fold out for the data.num_train split",
            )
        return
    if folds >= 2 and fold >= folds:
        yield (
            ("data.fold", "data.folds"),
            f"{_show(config, 'data.fold')} must be < {_show(config, 'data.folds')} "
            f"(folds are numbered 0 to {folds - 1})",
        )
    cases = config.phantoms.cases
    if cases > 0 and folds > cases:
        yield (
            ("data.folds", "phantoms.cases"),
            f"{_show(config, 'data.folds')} exceeds phantoms.cases={cases}: each fold needs a "
            f"validation case; set data.folds between 2 and {cases}",
        )
    if config.data.split_file is not None:
        yield (
            ("data.split_file", "data.folds"),
            f"{_show(config, 'data.split_file')} and {_show(config, 'data.folds')} are two "
            "different splits; set data.split_file=null for the folds, or data.folds=null",
        )


def _spacing_problems(config: Config) -> Iterator[_Problem]:
    """A target spacing of three positive finite mm, and not together with a reduction factor."""
    spacing = config.data.spacing_mm
    if spacing is None:
        return
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        yield ("data.spacing_mm",), f"{_show(config, 'data.spacing_mm')}: each value must be > 0 mm"
    if config.data.factor != 1:
        yield (
            ("data.spacing_mm", "data.factor"),
            f"{_show(config, 'data.spacing_mm')} replaces the reduction factor: set data.factor=1 "
            f"(found {_show(config, 'data.factor')})",
        )


def _mirror_problems(config: Config) -> Iterator[_Problem]:
    axes = list(config.data.mirror_axes)
    if any(isinstance(a, bool) or a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        yield (
            ("data.mirror_axes",),
            (
                f"{_show(config, 'data.mirror_axes')}: expected distinct axes among 0 "
                "(left-right), 1 (anterior-posterior), 2 (inferior-superior), e.g. [0, 1, 2], "
                "or [] for none"
            ),
        )


def _agreement_problems(config: Config) -> Iterator[_Problem]:
    """Keys that are valid alone but not together."""
    yield from _hu_window_problems(config)
    yield from _spacing_problems(config)
    yield from _level_problems(config)
    yield from _sampling_problems(config)
    yield from _fold_problems(config)
    yield from _mirror_problems(config)


def check_config(config: Config, source: str | Callable[[str], str] = "config") -> None:
    """Refuse choices and numbers out of range, and keys that do not agree; before any data is read.

    :func:`liverseg.config.load_config` and :func:`liverseg.config.from_dict` call it, so a
    checkpoint's config is checked too.

    Args:
        config: The config to check.
        source: Where the values came from, named in each message: one name (a file, a
            checkpoint), or a function from a dotted key to the source that set it.

    Raises:
        ConfigError: Listing every problem, each with its source, key, value and what is allowed,
            e.g. ``override inference.blending=hannn: inference.blending='hannn' is not one of
            hann, average; did you mean 'hann'?``.
    """
    source_of = source if callable(source) else (lambda key: source)
    problems = [
        *_choice_problems(config),
        *_range_problems(config),
        *_agreement_problems(config),
    ]
    lines = []
    for keys, text in problems:
        sources = list(dict.fromkeys(source_of(key) for key in keys))
        named = [s for s in sources if s != DEFAULT_SOURCE] or ["defaults"]
        lines.append(f"{' and '.join(named)}: {text}")
    if len(lines) == 1:
        raise ConfigError(lines[0])
    if lines:
        raise ConfigError(f"{len(lines)} problems in the config:\n  " + "\n  ".join(lines))
