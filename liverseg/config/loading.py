"""Building a config: dataclass defaults -> YAML file -> dotted ``key.sub=value`` overrides.

Every key and type is checked as the config is built, then its values (:func:`check_config`):
an unknown key names the nearest real key, a wrong type what was expected. Every message names
where the value came from: the YAML file, the override or the checkpoint. The result is frozen:
nothing mutates it after :func:`load_config` returns. The way back, to plain values for YAML
and checkpoints, is :func:`to_dict` and :func:`save_config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from liverseg.config.rules import CHOICES, check_config, nearest_hint
from liverseg.config.schema import DEFAULT_SOURCE, Config, all_keys, plain_value
from liverseg.errors import ConfigError


class _Origins:
    """Which source set each key: the last layer that holds it, else :data:`DEFAULT_SOURCE`.

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
        return DEFAULT_SOURCE


def _unknown_key(key: str, source: str) -> ConfigError:
    hint = nearest_hint(key, all_keys(), cutoff=0.0)
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _type_error(value: Any, tp: Any, key: str, source: str) -> ConfigError:
    return ConfigError(
        f"{source}: '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against type ``tp`` and convert lists to tuples; raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, key, source)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' expects {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args, strict=False))
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, tp, key, source)
        return {
            _coerce(k, args[0], key, source): _coerce(v, args[1], key, source)
            for k, v in value.items()
        }
    return _coerce_scalar(value, tp, key, source)


def _coerce_scalar(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against a bool, float, int or str ``tp``; an int is taken as a float."""
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(value, tp, key, source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(value, tp, key, source)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(value, tp, key, source)
        return value
    if tp is str:
        if value is False and "off" in CHOICES.get(key, ()):
            # YAML 1.1 reads an unquoted `off` as false: `train.amp=off` means the choice "off".
            return "off"
        if not isinstance(value, str):
            raise _type_error(value, tp, key, source)
        return value
    raise AssertionError(f"unsupported config type {tp} for {key}")


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


def to_dict(config: Any) -> dict:
    """A config dataclass as plain values (tuples become lists), for YAML or a checkpoint."""
    return plain_value(dataclasses.asdict(config))


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


def _read_yaml(path: Path) -> dict:
    """The nested values of the YAML file at ``path``, their keys and types checked."""
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
    return loaded


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
        values = _read_yaml(path)
        layers.append((values, str(path)))
    for text in overrides:
        keys, value = parse_override(text)
        source = f"override {text}"
        if ".".join(keys) not in all_keys():
            raise _unknown_key(".".join(keys), source)
        values = _with_leaf(values, keys, value)
        layers.append((_with_leaf({}, keys, value), source))
    return _checked(values, _Origins(layers))


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically.

    Args:
        config: The config to write.
        path: The YAML file to write, e.g. ``<run.dir>/config.yaml``.
    """
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
