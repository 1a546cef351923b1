"""Ensembles of checkpoints (liverseg.checkpoints.load_models) and the inference settings map."""

from __future__ import annotations

import pytest
import torch
from conftest import write_tiny_checkpoint

from liverseg.checkpoints import inference_settings, load_model, load_models, preprocessing_record
from liverseg.config import Config, InferenceConfig
from liverseg.errors import CheckpointError
from liverseg.model import UNet3D


def edited(path, edit):
    """``path``'s checkpoint with ``edit(state)`` applied in place, written back."""
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


def other_weights(path, seed=1, **kwargs):
    torch.manual_seed(seed)
    return write_tiny_checkpoint(path, model=UNet3D(1, 2, features=(4, 8)), **kwargs)


def test_one_checkpoint_loads_as_load_model_does(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "a.pt")
    models, settings = load_models([path], device="cpu")
    model, single = load_model(path, device="cpu")
    assert len(models) == 1 and settings == single
    assert settings.provenance == single.provenance


def test_an_ensemble_records_every_checkpoint(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a.pt")
    b = other_weights(tmp_path / "b.pt", epoch=7)
    models, settings = load_models([a, b], device="cpu")
    assert len(models) == 2
    assert not torch.equal(
        models[0].state_dict()["head.weight"], models[1].state_dict()["head.weight"]
    )
    assert settings.provenance == {
        "ensemble": [
            {"checkpoint": str(a), "epoch": 1, "liverseg_version": "0.1.0"},
            {"checkpoint": str(b), "epoch": 7, "liverseg_version": "0.1.0"},
        ]
    }


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda s: s["preprocessing"].update(factor=1), "data.factor"),
        (lambda s: s["preprocessing"].update(hu_min=-100.0), "data.hu_min"),
        (lambda s: s["config"]["data"].update(patch_size=32), "data.patch_size"),
    ],
    ids=["factor", "hu_window", "patch_size"],
)
def test_checkpoints_that_see_other_inputs_are_refused_naming_both_and_the_key(tmp_path, edit, key):
    a = write_tiny_checkpoint(tmp_path / "fold_0.pt")
    b = edited(other_weights(tmp_path / "fold_1.pt"), edit)
    with pytest.raises(CheckpointError) as info:
        load_models([a, b], device="cpu")
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert str(a) in message and str(b) in message and key in message


def test_how_the_window_runs_may_differ_the_first_checkpoint_decides(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a.pt")
    b = edited(
        other_weights(tmp_path / "b.pt"),
        lambda s: s["config"]["inference"].update(tta_flips=4, skip_air_windows=False),
    )
    _, settings = load_models([a, b], device="cpu")
    assert settings.tta_flips == 1 and settings.skip_air_windows is True


def test_no_checkpoint_is_refused():
    with pytest.raises(CheckpointError, match="no checkpoint given"):
        load_models([])


def test_skip_air_windows_comes_from_the_config():
    record = preprocessing_record(-150, 250, 2, "regions")
    assert inference_settings(Config(), record).skip_air_windows is True
    off = Config(inference=InferenceConfig(skip_air_windows=False))
    assert inference_settings(off, record).skip_air_windows is False
