import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import tiny_overrides, write_phantoms

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
    return write_phantoms(tmp_path_factory)


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


# Runs ``liverseg train ARGS`` but, once epoch 1 is on disk (metrics.csv, last.pt, curves.png),
# touches the READY file and blocks: the test kills it there, never earlier, never later.
TRAIN_UNTIL_EPOCH_1 = """
import sys
import threading
from pathlib import Path

import liverseg.training.fit as fit_module
from liverseg.cli import main

ready = Path(sys.argv[1])
record_epoch = fit_module.record_epoch


def record_then_block(run_dir, rows, state, checkpoints):
    record_epoch(run_dir, rows, state, checkpoints)
    ready.touch()
    threading.Event().wait()


fit_module.record_epoch = record_then_block
sys.exit(main(["train", *sys.argv[2:]]))
"""


def wait_for_file(path, process, log, timeout_s=600):
    """Wait until ``path`` exists; fail (killing ``process``) if it exits or never writes it."""
    deadline = time.monotonic() + timeout_s  # a safety net against hanging, not a speed test
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"training exited ({process.returncode}) before {path.name}:\n{log()}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"no {path.name} after {timeout_s} s; training stuck?\n{log()}")
        time.sleep(0.05)


def test_killed_run_resumes_with_continuous_metrics(phantom_root, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(phantom_root, run_dir, "train.epochs=4", "train.val_every=4")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ready, stderr = tmp_path / "ready", tmp_path / "stderr.txt"
    with stderr.open("w") as err:  # a file, not a pipe: a full pipe would block the child
        process = subprocess.Popen(
            [sys.executable, "-c", TRAIN_UNTIL_EPOCH_1, str(ready), *overrides],
            env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        try:
            wait_for_file(ready, process, lambda: stderr.read_text()[-2000:])
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    last = run_dir / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["epoch"] == 1
    rows_at_kill = read_rows(run_dir)
    assert [r["epoch"] for r in rows_at_kill] == ["1"]
    command = [sys.executable, str(REPO / "main.py"), *overrides]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"resuming {last} at epoch 2" in finished.stderr
    rows = read_rows(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0] == rows_at_kill[0]  # epoch 1 was kept, not trained again
    assert load_checkpoint(last)["epoch"] == 4


def test_crash_while_writing_metrics_loses_no_row(phantom_root, tmp_path, monkeypatch):
    import liverseg.training.run_folder as train_module
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
        ("train.loss=dice", "train.loss='dice' is not one of bce, bce_dice, ce, ce_dice"),
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


def one_case_epoch(phantom_root, tmp_path, monkeypatch, iterations, *extra, loss=None):
    """Train one epoch on one case (5 patches, batch 2: 3 batches a pass); its loss calls.

    Returns:
        (batch sizes seen by the loss, one per iteration; Adam steps taken; the epoch's loss).
    """
    import liverseg.training.fit as train
    from liverseg.training.preflight import find_training_cases
    from liverseg.training.run_start import build_training_state

    config = load_config(
        None,
        tiny_overrides(
            phantom_root, tmp_path / "run", "data.samples_per_volume=5", "data.batch_size=2",
            f"train.iterations_per_epoch={iterations}", *extra,
        ),
    )  # fmt: skip
    case = find_training_cases(config)[:1]
    loader = train.build_training_loader(config, case, tmp_path / "cache")
    assert len(loader) == 3
    device = torch.device("cpu")
    model, optimizer, scaler = build_training_state(config, device, None)
    sizes, real_loss = [], train.compute_loss

    def counting_loss(logits, label, name):
        sizes.append(label.shape[0])
        return loss if loss is not None else real_loss(logits, label, name)

    monkeypatch.setattr(train, "compute_loss", counting_loss)
    epoch_loss = train.train_one_epoch(
        model, loader, optimizer, scaler, epoch=1, config=config, device=device, dtype=None
    )
    steps = [int(state["step"]) for state in optimizer.state.values()]
    return sizes, steps[0] if steps else 0, epoch_loss


@pytest.mark.parametrize(
    "iterations, sizes",
    [
        (0, [2, 2, 1]),  # one pass over the queue, as the seed
        (2, [2, 2]),  # fewer than a pass: stops mid-pass
        (7, [2, 2, 1, 2, 2, 1, 2]),  # more than a pass: the queue refills twice
    ],
)
def test_iterations_per_epoch_is_exact(phantom_root, tmp_path, monkeypatch, iterations, sizes):
    import math

    seen, steps, loss = one_case_epoch(phantom_root, tmp_path, monkeypatch, iterations)
    assert seen == sizes
    assert steps == len(sizes)
    assert math.isfinite(loss)


def test_skipped_non_finite_steps_count_as_iterations(phantom_root, tmp_path, monkeypatch):
    import math

    nan = torch.tensor(float("nan"))
    seen, steps, loss = one_case_epoch(
        phantom_root, tmp_path, monkeypatch, 7, "train.max_nonfinite=8", loss=nan
    )
    assert len(seen) == 7 and steps == 0 and math.isnan(loss)


def test_logged_validation_dice_equals_evaluate_on_the_final_predictions(phantom_root, tmp_path):
    from liverseg.data.splits import validation_cases
    from liverseg.evaluation.folders import evaluate_folders

    run_dir = tmp_path / "run"
    fit(load_config(None, tiny_overrides(phantom_root, run_dir, "run.final_predictions=true")))
    last_row = read_rows(run_dir)[-1]
    table = tmp_path / "metrics.csv"
    evaluate_folders(
        run_dir / "predictions",
        phantom_root,
        out_csv=table,
        cases=validation_cases(run_dir / "split.json"),
    )
    with table.open() as f:
        mean = next(row for row in csv.DictReader(f) if row["case_id"] == "mean")
    for name in ("liver_excl_tumor", "liver_incl_tumor", "tumor"):
        logged, evaluated = last_row[f"dice_{name}"], float(mean[f"dice_{name}"])
        if logged in ("", "nan"):
            assert np.isnan(evaluated), name
        else:
            assert float(logged) == pytest.approx(evaluated, abs=5e-5), name


# Damaged run folders: one 2-epoch run, copied for each kind of damage, then resumed.


@pytest.fixture(scope="module")
def trained_run(phantom_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    fit(load_config(None, tiny_overrides(phantom_root, run_dir)))
    return run_dir


def copy_run(trained_run, tmp_path):
    import shutil

    return shutil.copytree(trained_run, tmp_path / "run")


def test_garbage_split_json_is_one_line_with_the_fix(phantom_root, trained_run, tmp_path, capsys):
    run_dir = copy_run(trained_run, tmp_path)
    (run_dir / "split.json").write_text('{"train": ["liver_0", "liv')
    code = cli_main(["train", *tiny_overrides(phantom_root, run_dir, "train.epochs=3")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "split.json is not readable JSON" in line and "delete it" in line
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 2


def garble_a_row(text):
    return text + "xx,garbage,,\n"


def change_a_value(text):
    lines = text.splitlines(keepends=True)
    lines[1] = lines[1].replace(lines[1].split(",")[1], "0.123456", 1)
    return "".join(lines)


@pytest.mark.parametrize(
    "damage, message",
    [
        (garble_a_row, "epoch 'xx' is not a whole number"),
        (lambda text: "", "is empty"),
        (change_a_value, "disagrees with"),
    ],
    ids=["garbage-row", "emptied", "changed-value"],
)
def test_damaged_metrics_csv_is_rewritten_from_the_checkpoint(
    phantom_root, trained_run, tmp_path, caplog, damage, message
):
    run_dir = copy_run(trained_run, tmp_path)
    metrics = run_dir / "metrics.csv"
    before = read_rows(run_dir)
    metrics.write_text(damage(metrics.read_text()))
    fit(load_config(None, tiny_overrides(phantom_root, run_dir, "train.epochs=3")))
    rows = read_rows(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[:2] == before  # the history came back from the checkpoint
    (warning,) = [r.message for r in caplog.records if "rewritten from" in r.message]
    assert str(metrics) in warning and message in warning and "last.pt" in warning


def test_truncated_cache_array_is_rebuilt(phantom_root, trained_run, tmp_path, caplog):
    run_dir = copy_run(trained_run, tmp_path)
    image = sorted((run_dir / "cache").glob("*.image.npy"))[0]
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) // 2])
    fit(load_config(None, tiny_overrides(phantom_root, run_dir, "train.epochs=3")))
    assert image.read_bytes() == whole
    assert any(
        "is damaged" in r.message and "rebuilding" in r.message and image.name[:20] in r.message
        for r in caplog.records
    )
    assert [r["epoch"] for r in read_rows(run_dir)] == ["1", "2", "3"]


def test_stale_temp_files_are_removed_at_start(phantom_root, trained_run, tmp_path, caplog):
    run_dir = copy_run(trained_run, tmp_path)
    cache_entry = sorted((run_dir / "cache").glob("*.image.npy"))[0].name
    stale = [
        run_dir / "checkpoints" / ".last.pt.abc123.tmp.pt",
        run_dir / ".curves.png.k3x9q0ab.tmp.png",
        run_dir / ".metrics.csv.k3x9q0ab.tmp.csv",
        run_dir / "predictions" / ".liver_1_seg.nii.gz.k3x9q0ab.tmp.nii.gz",
        run_dir / "predictions" / ".summary.csv.k3x9q0ab.tmp.csv",
        run_dir / "cache" / f".{cache_entry}.k3x9q0ab.tmp.image.npy",
    ]
    kept = [run_dir / "notes.txt", run_dir / ".hidden", run_dir / "checkpoints" / ".x.tmp.pt"]
    for path in [*stale, *kept]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
    # train.epochs=2: the run is complete, so nothing is trained; the folders are cleaned
    with caplog.at_level("INFO", logger="liverseg.io"):
        fit(load_config(None, tiny_overrides(phantom_root, run_dir)))
    assert [p.name for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert any("removed 6 temp files (6000 bytes)" in r.message for r in caplog.records)


def test_shared_cache_keeps_temp_files_another_run_may_be_writing(phantom_root, tmp_path):
    from liverseg.training.run_folder import remove_stale_temps

    shared = tmp_path / "shared_cache"
    shared.mkdir()
    old, new = shared / ".a.image.npy.k3x9q0ab.tmp.image.npy", shared / ".b.json.abc.tmp.json"
    for path in (old, new):
        path.write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    overrides = tiny_overrides(phantom_root, tmp_path / "run", f"data.cache_dir={shared}")
    remove_stale_temps(load_config(None, overrides))
    assert not old.exists() and new.exists()


def test_checkpoint_without_training_state_is_refused(phantom_root, trained_run, tmp_path):
    run_dir = copy_run(trained_run, tmp_path)
    last = run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["optimizer"]
    torch.save(state, last)
    with pytest.raises(CheckpointError, match=r"last.pt: it lacks a training run's state"):
        fit(load_config(None, tiny_overrides(phantom_root, run_dir, "train.epochs=3")))


def test_validation_does_not_change_what_training_draws(phantom_root, tmp_path):
    # Validating after epoch 1 or not, epoch 2 trains on the same patches: inference draws nothing
    # from the global RNG (the torchio window it once used did, 3+ draws per validated case).
    weights = []
    for val_every in (1, 2):
        run_dir = tmp_path / f"val_every_{val_every}"
        overrides = tiny_overrides(phantom_root, run_dir, f"train.val_every={val_every}")
        fit(load_config(None, overrides))
        weights.append(load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"])
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=0)


def test_a_target_spacing_run_records_it_and_predicts_in_the_input_geometry(phantom_root, tmp_path):
    import nibabel as nib

    from liverseg.checkpoints import load_model
    from liverseg.inference.volume import predict_volume

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        phantom_root, run_dir, "data.spacing_mm=[12, 12, 10]", "train.epochs=1",
        "run.final_predictions=true",
    )  # fmt: skip
    fit(load_config(None, overrides))
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["preprocessing"]["spacing_mm"] == [12.0, 12.0, 10.0]
    model, settings = load_model(run_dir / "checkpoints" / "last.pt", "cpu")
    assert settings.spacing_mm == (12.0, 12.0, 10.0)
    (prediction_file,) = (run_dir / "predictions").glob("*_seg.nii.gz")
    image = phantom_root / "imagesTr" / prediction_file.name.replace("_seg", "")
    written, source = nib.load(prediction_file), nib.load(image)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert predict_volume(model, image, settings).labels.shape == source.shape
    # A checkpoint written before target spacings existed has no key: it loads without one.
    del state["preprocessing"]["spacing_mm"]
    torch.save(state, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt", "cpu")[1].spacing_mm is None
