import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from liverseg.checkpoints import load_checkpoint
from liverseg.cli import main as cli_main
from liverseg.config import from_dict, load_config, to_dict
from liverseg.devices import training_layout
from liverseg.errors import CheckpointError, DataError, TrainingError
from liverseg.phantoms import write_dataset
from liverseg.training.fit import fit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "data"
    write_dataset(root, cases=4, shape=(40, 40, 32), seed=0, test_cases=0)
    return root


def tiny_overrides(root, run_dir, *extra):
    return (
        f"data.root={root}",
        f"run.dir={run_dir}",
        "data.num_train=3",
        "data.factor=1",
        "data.shape=[40, 40, 32]",
        "data.patch_size=16",
        "data.num_workers=0",
        "data.queue_length=6",
        "data.samples_per_volume=2",
        "model.features=[4, 8]",
        "train.epochs=2",
        "train.val_every=1",
        "inference.batch_size=8",
        *extra,
    )


def read_rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_two_epoch_run_writes_every_file(phantom_root, tmp_path):
    run_dir = tmp_path / "run"
    result = fit(load_config(None, tiny_overrides(phantom_root, run_dir)))
    for name in ("config.yaml", "split.json", "metrics.csv", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    rows = read_rows(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(r["dice_liver_incl_tumor"] != "" for r in rows)
    assert 0 <= float(rows[-1]["dice_liver_incl_tumor"]) <= 1
    assert result["epoch"] == 2
    # the checkpoint loads with weights_only=True and carries config and preprocessing
    raw = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert raw["epoch"] == 2 and raw["preprocessing"]["head"] == "regions"
    assert from_dict(raw["config"]) == load_config(None, tiny_overrides(phantom_root, run_dir))
    assert (run_dir / "checkpoints" / "best.pt").is_file()


def test_resume_continues_without_duplicate_rows(phantom_root, tmp_path):
    run_dir = tmp_path / "run"
    fit(load_config(None, tiny_overrides(phantom_root, run_dir, "train.epochs=1")))
    fit(load_config(None, tiny_overrides(phantom_root, run_dir, "train.epochs=3")))
    assert [r["epoch"] for r in read_rows(run_dir)] == ["1", "2", "3"]
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["epoch"] == 3
    # the optimizer state went on: 3 epochs x (3 cases x 2 patches / batch 2) Adam steps
    assert int(checkpoint["optimizer"]["state"][0]["step"]) == 9


def test_resume_refuses_a_changed_model(phantom_root, tmp_path):
    run_dir = tmp_path / "run"
    fit(load_config(None, tiny_overrides(phantom_root, run_dir, "train.epochs=1")))
    changed = tiny_overrides(phantom_root, run_dir, "model.features=[4, 8, 16]")
    with pytest.raises(TrainingError, match=r"model.features: \[4, 8\] -> \[4, 8, 16\]"):
        fit(load_config(None, changed))


def test_corrupted_last_checkpoint_is_a_clear_error(phantom_root, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(bytes(range(256)) * 2)
    with pytest.raises(CheckpointError, match="last.pt is corrupted"):
        fit(load_config(None, tiny_overrides(phantom_root, run_dir)))


def test_non_finite_losses_stop_the_run_naming_epoch_and_cases(phantom_root, tmp_path, monkeypatch):
    import liverseg.training.fit as train

    monkeypatch.setattr(train, "compute_loss", lambda *a: torch.tensor(float("nan")))
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(phantom_root, run_dir, "train.max_nonfinite=2")
    with pytest.raises(TrainingError, match=r"epoch 1, iteration 2 \(cases in the batch: liver_"):
        fit(load_config(None, overrides))
    assert not (run_dir / "checkpoints" / "last.pt").exists()  # NaN is never saved


def test_missing_dataset_says_where_and_how(tmp_path, capsys):
    code = cli_main(["train", f"data.root={tmp_path / 'nowhere'}", f"run.dir={tmp_path / 'r'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "liverseg prepare" in err and "configs/demo.yaml" in err
    assert "Traceback" not in err


def test_phantom_folder_of_another_size_is_refused(phantom_root, tmp_path):
    from liverseg.errors import DataError

    overrides = tiny_overrides(phantom_root, tmp_path / "run", "phantoms.cases=6")
    with pytest.raises(DataError, match=r"holds 4 training cases but phantoms.cases=6"):
        fit(load_config(None, overrides))


def test_missing_phantoms_are_created(tmp_path):
    root = tmp_path / "made"
    overrides = tiny_overrides(
        root, tmp_path / "run", "phantoms.cases=4", "phantoms.shape=[40, 40, 32]", "train.epochs=1"
    )
    fit(load_config(None, overrides))
    assert len(list((root / "imagesTr").glob("*.nii.gz"))) == 4


def test_bad_case_stops_the_run_before_training(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, cases=3, shape=(40, 40, 32), seed=0, test_cases=0)
    (root / "labelsTr" / "liver_1.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="liver_1"):
        fit(load_config(None, tiny_overrides(root, tmp_path / "run")))


def test_killed_run_resumes_with_continuous_metrics(phantom_root, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(phantom_root, run_dir, "train.epochs=4", "train.val_every=4")
    command = [sys.executable, str(REPO / "main.py"), *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    epoch_at_kill = load_checkpoint(last)["epoch"]
    assert epoch_at_kill < 4, "the run finished before it could be killed"
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert [r["epoch"] for r in read_rows(run_dir)] == ["1", "2", "3", "4"]
    assert load_checkpoint(last)["epoch"] == 4
    assert f"resuming {last} at epoch {epoch_at_kill + 1}" in finished.stderr


def test_crash_while_writing_metrics_loses_no_row(phantom_root, tmp_path, monkeypatch):
    import liverseg.training.fit as train_module
    from liverseg.training.history import write_metrics as real_write

    run_dir = tmp_path / "run"
    calls = []

    def crash_on_second_epoch(path, rows):
        calls.append(len(rows))
        if len(rows) == 2:
            raise KeyboardInterrupt("killed while writing metrics.csv")
        real_write(path, rows)

    monkeypatch.setattr(train_module, "write_metrics", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(load_config(None, tiny_overrides(phantom_root, run_dir, "train.epochs=3")))
    monkeypatch.setattr(train_module, "write_metrics", real_write)
    # Epoch 2's checkpoint must not exist without its metrics row: the resume redoes epoch 2.
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    fit(load_config(None, tiny_overrides(phantom_root, run_dir, "train.epochs=3")))
    assert [r["epoch"] for r in read_rows(run_dir)] == ["1", "2", "3"]


def test_config_round_trips_through_a_checkpoint(tmp_path):
    from liverseg.checkpoints import save_checkpoint

    config = load_config(None, ("model.features=[4, 8]", "data.hu_min=-90"))
    path = save_checkpoint(
        tmp_path / "c.pt", model={}, config=to_dict(config), preprocessing={}, epoch=0
    )
    assert from_dict(load_checkpoint(path)["config"]) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.hu_max=-500", "data.hu_max"),
        ("train.loss=dice", "train.loss='dice': choose one of bce, bce_dice, ce, ce_dice"),
        ("model.norm=group", "model.norm"),
        ("data.patch_size=17", "data.patch_size=17 must be a multiple of 2"),
        ("model.deep_supervision=1", "model.deep_supervision=1 must be in [0, 0]"),
    ],
)
def test_bad_settings_fail_before_any_data_is_read(tmp_path, override, message):
    from liverseg.errors import ConfigError

    # data.root does not exist: the config is refused before the dataset is looked at
    overrides = tiny_overrides(tmp_path / "nowhere", tmp_path / "run", override)
    with pytest.raises(ConfigError, match=re.escape(message)):
        fit(load_config(None, overrides))


def test_final_predictions_come_from_the_last_checkpoint(phantom_root, tmp_path, monkeypatch):
    import json

    import liverseg.training.fit

    # Validation scores that fall after epoch 1: best.pt stays epoch 1's, last.pt is epoch 3's.
    falling = iter([0.9, 0.5, 0.1])

    def fake_validate(model, cases, config, device):
        score = next(falling)
        return {"liver_excl_tumor": score, "liver_incl_tumor": score, "tumor": score}

    monkeypatch.setattr(liverseg.training.fit, "validate", fake_validate)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        phantom_root, run_dir, "train.epochs=3", "run.final_predictions=true"
    )
    fit(load_config(None, overrides))
    assert torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 1
    reports = sorted((run_dir / "predictions").glob("*_report.json"))
    assert len(reports) == 1  # the one validation case
    model = json.loads(reports[0].read_text())["model"]
    assert model["epoch"] == 3 and model["checkpoint"].endswith("last.pt")
    assert (run_dir / "animation.html").is_file()


def test_deep_supervision_run_trains_and_its_checkpoint_predicts(phantom_root, tmp_path):
    from liverseg.checkpoints import load_model

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        phantom_root, run_dir, "model.features=[4, 8, 16]", "model.deep_supervision=1",
        "train.epochs=1",
    )  # fmt: skip
    fit(load_config(None, overrides))
    assert read_rows(run_dir)[0]["dice_liver_incl_tumor"] != ""
    model, _ = load_model(run_dir / "checkpoints" / "last.pt", "cpu")
    assert len(model.deep_heads) == 1 and not model.training


def test_resume_accepts_moved_data_and_other_workers(phantom_root, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    fit(load_config(None, tiny_overrides(phantom_root, run_dir, "train.epochs=1")))
    moved = tmp_path / "moved"
    shutil.copytree(phantom_root, moved)
    overrides = tiny_overrides(moved, run_dir, "train.epochs=2", "data.queue_length=4")
    fit(load_config(None, overrides))
    assert [r["epoch"] for r in read_rows(run_dir)] == ["1", "2"]


def test_poly_schedule_decays_and_is_logged(phantom_root, tmp_path):
    from liverseg.training.lr_schedules import learning_rate

    assert learning_rate(1e-3, "constant", 7, 10) == 1e-3
    assert learning_rate(1e-3, "poly", 1, 10) == 1e-3
    assert learning_rate(1e-3, "poly", 6, 10) == pytest.approx(1e-3 * 0.5**0.9)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(phantom_root, run_dir, "train.lr_schedule=poly", "train.lr=0.01")
    fit(load_config(None, overrides))
    lrs = [float(r["lr"]) for r in read_rows(run_dir)]
    assert lrs == pytest.approx([0.01, 0.01 * 0.5**0.9])


def test_training_layout_is_channels_last_only_for_cuda_autocast():
    assert training_layout(torch.device("cuda"), torch.bfloat16) == torch.channels_last_3d
    assert training_layout(torch.device("cuda"), None) == torch.contiguous_format
    assert training_layout(torch.device("cpu"), torch.bfloat16) == torch.contiguous_format
    assert training_layout(torch.device("cpu"), None) == torch.contiguous_format
