import pytest

from liverseg.config import Config, diff_configs, from_dict, load_config, to_dict
from liverseg.errors import ConfigError


def test_defaults_are_the_seed_design():
    c = Config()
    assert c.data.shape == (256, 256, 200)
    assert c.data.patch_size == 96
    assert c.data.num_train == 105
    assert c.data.label_probabilities == {0: 0.2, 1: 0.3, 2: 0.5}
    assert c.data.samples_per_volume == 5
    assert c.data.scales == (0.9, 1.1) and c.data.degrees == (-10.0, 10.0)
    assert c.train.lr == 1e-4 and c.train.epochs == 100 and c.train.loss == "bce"


def test_default_yaml_lists_every_key_with_default_values(tmp_path):
    import yaml

    from liverseg.config import all_keys

    path = __import__("pathlib").Path(__file__).parents[1] / "configs" / "default.yaml"
    loaded = yaml.safe_load(path.read_text())
    flat = []

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and f"{prefix}{k}" not in all_keys():
                walk(v, f"{prefix}{k}.")
            else:
                flat.append(f"{prefix}{k}")

    walk(loaded)
    assert sorted(flat) == sorted(all_keys())
    assert load_config(path) == Config()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  patch_size: 64\ntrain:\n  epochs: 3\n")
    c = load_config(path, ("train.epochs=5", "model.features=[8, 16]"))
    assert c.data.patch_size == 64
    assert c.train.epochs == 5
    assert c.model.features == (8, 16)
    assert c.data.shape == (256, 256, 200)


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match="did you mean 'data.patch_size'"):
        load_config(None, ("data.patch_sise=3",))


def test_unknown_key_in_yaml_names_file_and_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*train\.epoch.*train\.epochs"):
        load_config(path)


@pytest.mark.parametrize(
    "override", ["data.patch_size=abc", "train.amp=3", "data.shape=[1, 2]", "data.augment=1"]
)
def test_wrong_type_is_an_error(override):
    with pytest.raises(ConfigError):
        load_config(None, (override,))


def test_round_trip_through_plain_dict():
    c = load_config(None, ("data.hu_min=-100", "model.features=[4, 8, 16]"))
    assert from_dict(to_dict(c)) == c


def test_diff_lists_changed_leaves():
    a = to_dict(Config())
    b = to_dict(load_config(None, ("model.features=[4, 8]",)))
    assert diff_configs(a, b) == ["model.features: [32, 64, 128, 256] -> [4, 8]"]
