"""Configuration: dataclass defaults -> YAML file -> dotted ``key.sub=value`` overrides, checked.

Each section owns its defaults (:mod:`liverseg.config.schema`). ``configs/default.yaml`` lists
every key once; other YAML files hold only what they change. :func:`load_config` builds the config
(:mod:`liverseg.config.loading`) and checks it before any data is read
(:mod:`liverseg.config.rules`): an unknown key names the nearest real key, a choice outside
:data:`CHOICES` the nearest choice, a number outside :data:`RANGES` its range, and keys that must
agree (:func:`check_config`) each other. The loaded config is frozen.
"""

from liverseg.config.loading import (
    diff_configs,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from liverseg.config.rules import CHOICES, RANGES, Bounds, check_config
from liverseg.config.schema import (
    Config,
    DataConfig,
    InferenceConfig,
    ModelConfig,
    PhantomConfig,
    RunConfig,
    TrainConfig,
    all_keys,
)

__all__ = [
    "CHOICES",
    "RANGES",
    "Bounds",
    "Config",
    "DataConfig",
    "InferenceConfig",
    "ModelConfig",
    "PhantomConfig",
    "RunConfig",
    "TrainConfig",
    "all_keys",
    "check_config",
    "diff_configs",
    "from_dict",
    "load_config",
    "parse_override",
    "save_config",
    "to_dict",
]
