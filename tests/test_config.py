import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchio as tio

from liverseg.config import Config, diff_configs, from_dict, load_config, to_dict
from liverseg.devices import autocast_dtype
from liverseg.errors import ConfigError, LiversegError


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


# --- values checked when the config loads -------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "key, typo, nearest",
    [
        ("train.amp", "hannn", None),  # once accepted at load, refused only when training began
        ("train.amp", "bf61", "bf16"),
        ("inference.amp", "of", "off"),
        ("inference.blending", "hannn", "hann"),
        ("train.resume", "nevr", "never"),
        ("train.loss", "bce_dise", "bce_dice"),
        ("train.lr_schedule", "ploy", "poly"),
        ("model.norm", "instnace", "instance"),
        ("train.device", "cdua", "cuda"),
    ],
)
def test_choice_typo_is_refused_at_load_naming_the_nearest_choice(key, typo, nearest):
    with pytest.raises(ConfigError) as error:
        load_config(None, (f"{key}={typo}",))
    message = str(error.value)
    assert message.startswith(f"override {key}={typo}: {key}='{typo}' is not ")
    if nearest is None:  # nothing alike: the choices alone
        assert message.endswith("is not one of auto, bf16, fp16, off")
    else:
        assert message.endswith(f"; did you mean '{nearest}'?")


def test_choice_typo_in_yaml_names_the_file_and_the_choices(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inference:\n  blending: hannn\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == (
        f"{path}: inference.blending='hannn' is not one of hann, average; did you mean 'hann'?"
    )


def test_bad_override_is_blamed_on_the_override_not_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  val_every: 1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ("train.epochs=0",))
    assert str(error.value) == "override train.epochs=0: train.epochs=0 must be >= 1"
    with pytest.raises(ConfigError, match=r"^override data\.patch_size=abc: 'data\.patch_size'"):
        load_config(path, ("data.patch_size=abc",))


def test_bad_yaml_value_is_blamed_on_the_yaml_despite_other_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inference:\n  overlap: 1.5\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ("train.epochs=3",))
    assert str(error.value) == f"{path}: inference.overlap=1.5 must be in [0, 1)"


def test_override_replaces_a_mapping_value_rather_than_merging_into_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  label_probabilities: {0: 0.5, 1: 0.5}\n")
    config = load_config(path, ("data.label_probabilities={2: 1.0}",))
    assert config.data.label_probabilities == {2: 1.0}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.val_every=0", "train.val_every=0 must be >= 1"),
        ("train.epochs=0", "train.epochs=0 must be >= 1"),
        ("train.epochs=-1", "train.epochs=-1 must be >= 1"),
        ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
        ("data.patch_size=0", "data.patch_size=0 must be >= 1"),
        ("inference.overlap=1.5", "inference.overlap=1.5 must be in [0, 1)"),
        ("inference.overlap=1", "inference.overlap=1.0 must be in [0, 1)"),
        ("inference.batch_size=0", "inference.batch_size=0 must be >= 1"),
        ("train.lr=0", "train.lr=0.0 must be > 0"),
        ("model.dropout=1", "model.dropout=1.0 must be in [0, 1)"),
        ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
        ("data.shape=[96, 0, 64]", "data.shape=[96, 0, 64]: each value must be >= 1"),
        ("data.scales=[0, 1.1]", "data.scales=[0.0, 1.1]: each value must be > 0"),
    ],
)
def test_number_out_of_range_is_refused_at_load(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, (override,))
    assert str(error.value) == f"override {override}: {message}"


def test_range_ends_that_are_allowed_load():
    config = load_config(
        None,
        (
            "train.epochs=1",
            "train.val_every=1",
            "inference.overlap=0",
            "train.iterations_per_epoch=0",
            "data.num_workers=0",
            "phantoms.cases=0",
        ),
    )
    assert config.train.epochs == 1 and config.inference.overlap == 0.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("data.hu_max=-500",), "data.hu_max=-500.0 must exceed data.hu_min=-150.0"),
        (("data.hu_min=250",), "data.hu_max=250.0 must exceed data.hu_min=250.0"),
        (
            ("model.features=[4, 8, 16]", "data.patch_size=18"),
            "data.patch_size=18 must be a multiple of 4 for model.features=[4, 8, 16] "
            "(2 ** (levels - 1)); use 16 or 20",
        ),
        (
            ("model.features=[4, 8, 16]", "data.patch_size=2"),
            "data.patch_size=2 must be a multiple of 4 for model.features=[4, 8, 16] "
            "(2 ** (levels - 1)); use 4",
        ),
        (("model.features=[8]",), "model.features=[8]: at least 2 levels are needed"),
        (
            ("model.features=[4, 8, 16]", "model.deep_supervision=2"),
            "model.deep_supervision=2 must be in [0, 1] for model.features=[4, 8, 16]",
        ),
        (("data.label_probabilities={3: 1.0}",), "data.label_probabilities={3: 1.0}: keys must"),
        (("data.label_probabilities={0: 0.0}",), "values >= 0 and not all 0"),
        (
            ("phantoms.cases=8", "data.num_train=8"),
            "data.num_train=8 leaves no validation case of phantoms.cases=8; set data.num_train "
            "between 1 and 7",
        ),
    ],
)
def test_keys_that_do_not_agree_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_keys_that_agree_load():
    config = load_config(
        None,
        (
            "model.features=[4, 8, 16]",
            "data.patch_size=20",
            "model.deep_supervision=1",
            "phantoms.cases=8",
            "data.num_train=7",
        ),
    )
    assert config.data.patch_size == 20 and config.model.deep_supervision == 1


def test_disagreement_names_every_source_that_set_its_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  features: [4, 8, 16]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ("data.patch_size=18",))
    assert str(error.value).startswith(f"override data.patch_size=18 and {path}: data.patch_size")


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        load_config(None, ("train.val_every=0", "inference.blending=hannn", "data.hu_max=-500"))
    lines = str(error.value).splitlines()
    assert lines[0] == "3 problems in the config:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "override inference.blending=hannn",
        "override train.val_every=0",
        "override data.hu_max=-500",
    ]


def test_a_checkpoints_config_is_checked_naming_the_checkpoint():
    values = to_dict(Config())
    values["inference"]["blending"] = "hannn"
    with pytest.raises(ConfigError, match=r"^checkpoint run/last\.pt: inference\.blending='hannn'"):
        from_dict(values, source="checkpoint run/last.pt")


def test_demo_config_runs_fp32_on_a_cpu_at_one_physical_scale():
    config = load_config(REPO / "configs" / "demo.yaml")
    # auto: fp32 on CPU (bf16 is emulated, 45x slower, where the CPU lacks it), bf16 on CUDA.
    assert config.train.amp == "auto" and config.inference.amp == "auto"
    assert config.data.spacing_mm is not None and config.data.factor == 1


def test_train_with_a_bad_choice_exits_2_and_creates_nothing(tmp_path, capsys):
    from liverseg.cli import main

    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"data.root={tmp_path / 'data'}",
            f"run.dir={tmp_path / 'run'}",
            "inference.blending=hannn",
        ]
    )
    assert code == 2
    assert list(tmp_path.iterdir()) == []  # no phantoms, no run folder
    assert "override inference.blending=hannn: " in capsys.readouterr().err


# --- amp: one function for training and inference ----------------------------------------------


def test_amp_auto_trains_fp32_on_cpu_and_mps_and_forced_dtypes_apply_anywhere():
    cpu, mps = torch.device("cpu"), torch.device("mps")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("auto", mps) is None
    assert autocast_dtype("auto", mps, inference=True) is None
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fp16", mps) == torch.float16
    with pytest.raises(LiversegError, match="amp must be one of auto, bf16, fp16, off"):
        autocast_dtype("hannn", cpu)


def test_training_and_inference_resolve_amp_with_the_same_function():
    import liverseg.inference.volume
    import liverseg.training.run_start

    assert liverseg.training.run_start.autocast_dtype is autocast_dtype
    assert liverseg.inference.volume.autocast_dtype is autocast_dtype


class AutocastProbe(torch.nn.Module):
    """A 1x1x1 convolution that records the CPU autocast dtype of each forward (None: off)."""

    size_multiple = 1

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, kernel_size=1)
        self.seen = set()

    def forward(self, x):
        enabled = torch.is_autocast_enabled("cpu")
        self.seen.add(torch.get_autocast_dtype("cpu") if enabled else None)
        return self.conv(x)


@pytest.mark.parametrize("native", [False, True])
def test_amp_auto_infers_in_bf16_only_on_a_cpu_that_runs_it_natively(monkeypatch, native):
    import liverseg.devices as devices

    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert devices.autocast_dtype("auto", cpu, inference=True) == (
        torch.bfloat16 if native else None
    )
    assert devices.autocast_dtype("auto", cpu) is None  # training stays fp32 on any CPU
    assert devices.autocast_dtype("off", cpu, inference=True) is None


@pytest.mark.parametrize(
    "amp, native, expected",
    [
        ("auto", False, None),
        ("auto", True, torch.bfloat16),
        ("off", True, None),
        ("bf16", False, torch.bfloat16),
    ],
)
def test_inference_amp_on_cpu(monkeypatch, amp, native, expected):
    import liverseg.devices as devices
    from liverseg.inference.settings import InferenceSettings
    from liverseg.inference.volume import predict_volume

    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: native)
    devices._warn_emulated_bf16.cache_clear()
    probe = AutocastProbe()
    image = tio.ScalarImage(tensor=torch.zeros(1, 8, 8, 8), affine=np.eye(4))
    settings = InferenceSettings(hu_min=-150, hu_max=250, patch_size=8, amp=amp, postprocess=None)
    predict_volume(probe, image, settings, device="cpu")
    assert probe.seen == {expected}


@pytest.mark.gpu
def test_amp_auto_is_bf16_on_cuda_where_supported():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert autocast_dtype("auto", torch.device("cuda")) == expected


def test_unquoted_off_is_the_amp_choice_off(tmp_path):
    # YAML 1.1 reads `off` as false; for a key whose choices include "off" it means that choice.
    config = load_config(None, ("train.amp=off", "inference.amp=off"))
    assert (config.train.amp, config.inference.amp) == ("off", "off")
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\n")
    assert load_config(path).train.amp == "off"
    with pytest.raises(ConfigError, match="inference.blending"):
        load_config(None, ("inference.blending=off",))


def test_bf16_on_a_cpu_without_it_is_warned(monkeypatch, caplog):
    import liverseg.devices as devices

    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    devices._warn_emulated_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="liverseg.devices"):
        assert devices.autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
        devices.autocast_dtype("bf16", torch.device("cpu"))
    warnings = [r for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(warnings) == 1  # once per process
    devices._warn_emulated_bf16.cache_clear()


@pytest.mark.parametrize(
    "override",
    ["train.seed=-1", "data.split_seed=-3", "phantoms.seed=4294967296", "data.degrees=[-200,10]"],
)
def test_seeds_and_rotations_have_ranges(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, (override,))


def test_tta_flips_choices_are_checked_at_load():
    assert load_config(None, ("inference.tta_flips=8",)).inference.tta_flips == 8
    with pytest.raises(ConfigError, match=r"inference.tta_flips=3 is not one of 1, 2, 4, 8"):
        load_config(None, ("inference.tta_flips=3",))


def test_folds_are_off_by_default_and_a_fold_of_k_loads():
    assert Config().data.folds is None and Config().data.fold == 0
    assert load_config(Path(__file__).parents[1] / "configs/demo.yaml").data.folds is None
    config = load_config(None, ("data.folds=5", "data.fold=4"))
    assert (config.data.folds, config.data.fold) == (5, 4)
    # with folds, data.num_train no longer has to leave validation phantoms
    config = load_config(None, ("data.folds=2", "phantoms.cases=8", "data.num_train=8"))
    assert config.data.folds == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("data.folds=1",), "override data.folds=1: data.folds=1 must be >= 2"),
        (("data.folds=5", "data.fold=-1"), "override data.fold=-1: data.fold=-1 must be >= 0"),
        (
            ("data.folds=5", "data.fold=5"),
            "override data.fold=5 and override data.folds=5: data.fold=5 must be < data.folds=5 "
            "(folds are numbered 0 to 4)",
        ),
        (("data.fold=2",), "override data.fold=2: data.fold=2 needs data.folds"),
        (
            ("data.folds=9", "phantoms.cases=8", "data.num_train=7"),
            "data.folds=9 exceeds phantoms.cases=8: each fold needs a validation case; set "
            "data.folds between 2 and 8",
        ),
        (
            ("data.folds=5", "data.split_file=runs/a/split.json"),
            "data.split_file='runs/a/split.json' and data.folds=5 are two different splits",
        ),
        (("data.folds=2.5",), "'data.folds' expects int"),
    ],
)
def test_fold_settings_that_cannot_work_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)
