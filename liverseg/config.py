"""Configuration: dataclass defaults -> YAML file -> dotted ``key.sub=value`` overrides.

Each section owns its defaults. ``configs/default.yaml`` lists every key once; other YAML files
hold only what they change. The config is checked as it is built, before any data is read: an
unknown key names the nearest real key, a choice outside :data:`CHOICES` the nearest choice, a
number outside :data:`RANGES` its range, and keys that must agree (:func:`check_config`) each other.
Every message names where the value came from: the YAML file, the override or the checkpoint.
The loaded config is frozen: nothing mutates it after :func:`load_config` returns.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from liverseg.constants import (
    AMP_MODES,
    BACKGROUND,
    BLENDINGS,
    DEVICE_TYPES,
    LABEL_VALUES,
    LIVER,
    LOSSES,
    LR_SCHEDULES,
    NORMS,
    RESUME_MODES,
    TUMOR,
)
from liverseg.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """Where the cases are and how patches are drawn from them."""

    root: str = "data/Task03_Liver_half"
    num_train: int = 105
    split_file: str | None = None
    split_seed: int = 0
    # How much the volumes under `root` were reduced by `liverseg prepare` (1: originals).
    # Inference on an original-resolution volume predicts at 1/factor and resamples back.
    factor: int = 2
    shape: tuple[int, int, int] = (256, 256, 200)
    # Fixed HU window mapped linearly to (-1, 1); values outside are clipped.
    hu_min: float = -150.0
    hu_max: float = 250.0
    patch_size: int = 96
    label_probabilities: dict[int, float] = field(
        default_factory=lambda: {BACKGROUND: 0.2, LIVER: 0.3, TUMOR: 0.5}
    )
    samples_per_volume: int = 5
    queue_length: int = 40
    batch_size: int = 2
    num_workers: int = 2
    augment: bool = True
    scales: tuple[float, float] = (0.9, 1.1)
    degrees: tuple[float, float] = (-10.0, 10.0)
    # Preprocessed arrays are cached here (default: <run.dir>/cache).
    cache_dir: str | None = None
    # Label affines that differ from the image's by more than this (mm) are an error,
    # unless copy_label_geometry is true.
    affine_tolerance_mm: float = 0.01
    copy_label_geometry: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """UNet3D shape. Output channels follow from the loss (see liverseg.training.losses)."""

    features: tuple[int, ...] = (32, 64, 128, 256)
    norm: str = "instance"
    dropout: float = 0.0
    # Extra low-resolution logit heads trained with a weighted loss (nnU-Net); 0: off (the seed).
    deep_supervision: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run control."""

    epochs: int = 100
    lr: float = 1e-4
    # "constant" (the seed) or "poly": lr * (1 - (epoch - 1) / epochs) ** 0.9, nnU-Net's decay.
    lr_schedule: str = "constant"
    loss: str = "bce"
    # "auto" (CUDA, MPS, CPU), "cpu", "cuda", "cuda:N" or "mps".
    device: str = "auto"
    # The same in training and inference (liverseg.devices.autocast_dtype): "auto" is bf16
    # autocast on CUDA (fp16 without bf16), fp32 on CPU and MPS; "bf16", "fp16", "off" force it.
    amp: str = "auto"
    seed: int = 0
    val_every: int = 5
    # "auto": continue from <run.dir>/checkpoints/last.pt when present; "never": start afresh.
    resume: str = "auto"
    max_nonfinite: int = 5
    # 0: one pass over the queue (the seed); N: exactly N iterations, the queue refilled as often
    # as needed (nnU-Net: 250).
    iterations_per_epoch: int = 0


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window prediction, used by validation and `liverseg predict`."""

    overlap: float = 0.5
    batch_size: int = 2
    blending: str = "hann"
    # As train.amp: "auto" is bf16/fp16 autocast on CUDA and fp32 on CPU and MPS.
    amp: str = "auto"
    keep_largest_liver: bool = True
    tumor_inside_liver: bool = True
    min_tumor_mm3: float = 10.0


@dataclass(frozen=True)
class PhantomConfig:
    """Synthetic cases created at data.root when it holds no dataset (cases: 0 never creates)."""

    cases: int = 0
    shape: tuple[int, int, int] = (128, 128, 96)
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    """The run folder and what is written at the end of training."""

    dir: str = "runs/default"
    # After training: predict the validation cases and animate one of them.
    final_predictions: bool = False


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    phantoms: PhantomConfig = field(default_factory=PhantomConfig)
    run: RunConfig = field(default_factory=RunConfig)


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
# Numeric keys whose values are limited; a value outside is refused when the config loads.
RANGES: dict[str, Bounds] = {
    "data.num_train": Bounds(1),
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
}
# Names the source of a key that no YAML file, override or checkpoint set.
_DEFAULT_SOURCE = "default"


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config dataclass, e.g. ``data.patch_size``."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


class _Origins:
    """Which source set each key: the last layer that holds it, else :data:`_DEFAULT_SOURCE`.

    Args:
        layers: ``(nested values, source)`` pairs in the order they were applied, e.g. the YAML
            file's values and its path, then each override's single key and ``"override k=v"``.
    """

    def __init__(self, layers: list[tuple[dict, str]]):
        self.layers = layers

    def of(self, key: str) -> str:
        for values, source in reversed(self.layers):
            node: Any = values
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                return source
        return _DEFAULT_SOURCE


def _nearest(value: str, choices: list[str] | tuple[str, ...], cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the choice most like ``value``, or "" if none is alike."""
    nearest = difflib.get_close_matches(str(value), choices, n=1, cutoff=cutoff)
    return f"; did you mean '{nearest[0]}'?" if nearest else ""


def _unknown_key(key: str, source: str) -> ConfigError:
    hint = _nearest(key, all_keys(), cutoff=0.0)
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against type ``tp`` and convert lists to tuples; raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(
        f"{source}: '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' expects {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args, strict=False))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {
            _coerce(k, args[0], key, source): _coerce(v, args[1], key, source)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise AssertionError(f"unsupported config type {tp} for {key}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, values: dict, prefix: str, origins: _Origins) -> Any:
    """The dataclass ``cls`` from nested values: keys and types checked, values not yet."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in names:
            raise _unknown_key(f"{prefix}{name}", origins.of(f"{prefix}{name}"))
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        key, tp, value = f"{prefix}{name}", hints[name], values[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{origins.of(key)}: '{key}' must be a section (a mapping)")
            kwargs[name] = _build(tp, value, f"{key}.", origins)
        else:
            kwargs[name] = _coerce(value, tp, key, origins.of(key))
    defaults = cls()
    merged = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls)}
    merged.update(kwargs)
    return cls(**merged)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _get(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _show(config: Config, key: str) -> str:
    """``key=value`` as the user wrote it (lists, quoted strings)."""
    return f"{key}={_plain(_get(config, key))!r}"


_Problem = tuple[tuple[str, ...], str]


def _choice_problems(config: Config) -> Iterator[_Problem]:
    for key, choices in CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            allowed = ", ".join(choices)
            yield (key,), f"{_show(config, key)} is not one of {allowed}{_nearest(value, choices)}"
    # Whether the device exists is asked when training starts: a checkpoint moves between machines.
    kind, colon, index = config.train.device.partition(":")
    if kind not in DEVICE_TYPES or (colon and (kind == "auto" or not index.isdigit())):
        hint = _nearest(kind, DEVICE_TYPES)
        text = f"{_show(config, 'train.device')} is not auto, cpu, cuda, cuda:N or mps{hint}"
        yield ("train.device",), text


def _range_problems(config: Config) -> Iterator[_Problem]:
    for key, bounds in RANGES.items():
        value = _get(config, key)
        if isinstance(value, tuple):
            if not all(v in bounds for v in value):
                yield (key,), f"{_show(config, key)}: each value must be {bounds}"
        elif value not in bounds:
            yield (key,), f"{_show(config, key)} must be {bounds}"


def _agreement_problems(config: Config) -> Iterator[_Problem]:
    """Keys that are valid alone but not together."""
    data, model = config.data, config.model
    if not data.hu_max > data.hu_min:
        yield (
            ("data.hu_min", "data.hu_max"),
            f"{_show(config, 'data.hu_max')} must exceed {_show(config, 'data.hu_min')}",
        )
    levels = len(model.features)
    features = _show(config, "model.features")
    if levels < 2:
        yield ("model.features",), f"{features}: at least 2 levels are needed"
    multiple = 2 ** max(levels - 1, 0)
    if levels >= 2 and data.patch_size >= 1 and data.patch_size % multiple:
        lower = data.patch_size // multiple * multiple
        use = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
        yield (
            ("data.patch_size", "model.features"),
            f"{_show(config, 'data.patch_size')} must be a multiple of {multiple} for {features} "
            f"(2 ** (levels - 1)); use {use}",
        )
    if not 0 <= model.deep_supervision <= max(levels - 2, 0):
        yield (
            ("model.deep_supervision", "model.features"),
            f"{_show(config, 'model.deep_supervision')} must be in [0, {max(levels - 2, 0)}] for "
            f"{features} (at most levels - 2)",
        )
    probabilities = data.label_probabilities
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
    if cases > 0 and data.split_file is None and not data.num_train < cases:
        yield (
            ("data.num_train", "phantoms.cases"),
            f"{_show(config, 'data.num_train')} leaves no validation case of "
            f"phantoms.cases={cases}; set data.num_train between 1 and {cases - 1}",
        )


def check_config(config: Config, source: str | Callable[[str], str] = "config") -> None:
    """Refuse choices and numbers out of range, and keys that do not agree; before any data is read.

    :func:`load_config` and :func:`from_dict` call it, so a checkpoint's config is checked too.

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
        named = [s for s in sources if s != _DEFAULT_SOURCE] or ["defaults"]
        lines.append(f"{' and '.join(named)}: {text}")
    if len(lines) == 1:
        raise ConfigError(lines[0])
    if lines:
        raise ConfigError(f"{len(lines)} problems in the config:\n  " + "\n  ".join(lines))


def to_dict(config: Any) -> dict:
    """A config dataclass as plain values (tuples become lists), for YAML or a checkpoint."""
    return _plain(dataclasses.asdict(config))


def _checked(values: dict, origins: _Origins) -> Config:
    config = _build(Config, values, "", origins)
    check_config(config, origins.of)
    return config


def from_dict(values: dict, source: str = "config") -> Config:
    """Build a :class:`Config` from nested plain values, checking every key, type and value.

    Args:
        values: Nested sections of plain values, e.g. a checkpoint's ``config``.
        source: Where they come from, named in error messages (e.g. ``checkpoint run/last.pt``).

    Raises:
        ConfigError: Unknown key, wrong type or invalid value (see :func:`check_config`).
    """
    return _checked(values, _Origins([(values, source)]))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.sub=value`` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def _with_leaf(values: dict, keys: list[str], value: Any) -> dict:
    """A copy of nested ``values`` whose leaf at ``keys`` is ``value`` (replaced, not merged)."""
    out = dict(values)
    if len(keys) == 1:
        out[keys[0]] = value
    else:
        section = out.get(keys[0])
        out[keys[0]] = _with_leaf(section if isinstance(section, dict) else {}, keys[1:], value)
    return out


def load_config(path: str | Path | None = None, overrides: tuple = ()) -> Config:
    """Resolve defaults, then the YAML file at ``path``, then dotted overrides; check the result.

    Args:
        path: YAML file holding the keys it changes, or None for the defaults.
        overrides: Strings ``key.sub=value``; each must name a real key and replaces its value.

    Returns:
        The frozen resolved config.

    Raises:
        ConfigError: Unreadable file, unknown key, wrong type, or a value :func:`check_config`
            refuses; the message names the file or the override the value came from.
    """
    values: dict = {}
    layers: list[tuple[dict, str]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        # Keys and types of the file alone, so that an override cannot hide the file's typo.
        _build(Config, loaded, "", _Origins([(loaded, str(path))]))
        values = loaded
        layers.append((loaded, str(path)))
    for text in overrides:
        keys, value = parse_override(text)
        source = f"override {text}"
        if ".".join(keys) not in all_keys():
            raise _unknown_key(".".join(keys), source)
        values = _with_leaf(values, keys, value)
        layers.append((_with_leaf({}, keys, value), source))
    return _checked(values, _Origins(layers))


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from liverseg.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def diff_configs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Lines ``key: old -> new`` for every leaf that differs between two plain config dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines.extend(diff_configs(a, b, f"{prefix}{key}."))
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines
