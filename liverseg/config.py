"""Configuration: dataclass defaults -> YAML file -> dotted ``key.sub=value`` overrides.

Each section owns its defaults. ``configs/default.yaml`` lists every key once; other YAML files
hold only what they change. An unknown key is an error naming the nearest real key. The loaded
config is frozen: nothing mutates it after :func:`load_config` returns.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from liverseg.constants import BACKGROUND, LIVER, TUMOR
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
    device: str = "auto"
    # "auto": bf16/fp16 autocast on CUDA, fp32 elsewhere; "bf16", "fp16" or "off" force it.
    amp: str = "auto"
    seed: int = 0
    val_every: int = 5
    # "auto": continue from <run.dir>/checkpoints/last.pt when present; "never": start afresh.
    resume: str = "auto"
    max_nonfinite: int = 5
    # Cap on iterations per epoch (0: one pass over the queue, as the seed does).
    iterations_per_epoch: int = 0


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window prediction, used by validation and `liverseg predict`."""

    overlap: float = 0.5
    batch_size: int = 2
    blending: str = "hann"
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


def _unknown_key(key: str, source: str) -> ConfigError:
    nearest = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.0)
    hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
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


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in names:
            raise _unknown_key(f"{prefix}{name}", source)
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        tp, value = hints[name], values[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{prefix}{name}' must be a section (a mapping)")
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}", source)
    defaults = cls()
    merged = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls)}
    merged.update(kwargs)
    return cls(**merged)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(config: Any) -> dict:
    """A config dataclass as plain values (tuples become lists), for YAML or a checkpoint."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def from_dict(values: dict, source: str = "config") -> Config:
    """Build a :class:`Config` from nested plain values, checking every key and type."""
    return _build(Config, values, "", source)


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


def load_config(path: str | Path | None = None, overrides: tuple = ()) -> Config:
    """Resolve defaults, then the YAML file at ``path``, then dotted overrides.

    Args:
        path: YAML file holding the keys it changes, or None for the defaults.
        overrides: Strings ``key.sub=value``; each must name a real key.

    Returns:
        The frozen resolved config.

    Raises:
        ConfigError: Unreadable file, unknown key or wrong type.
    """
    values: dict = {}
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
        from_dict(loaded, source=str(path))
        values = loaded
    for text in overrides:
        keys, value = parse_override(text)
        if ".".join(keys) not in all_keys():
            raise _unknown_key(".".join(keys), "override")
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        values = _merge(values, nested)
    return from_dict(values, source=str(path) if path else "override")


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
