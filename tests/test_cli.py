"""The ``liverseg`` command: every subcommand's help and its exit codes.

0: success; 1: the command ran but found problems; 2: bad user input (one ``error:`` line on stderr,
no traceback) or an argparse usage error.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_tiny_checkpoint

from liverseg.cli import main
from liverseg.model import UNet3D
from liverseg.phantoms import write_dataset

torch.set_num_threads(1)

SUBCOMMANDS = [
    "phantoms",
    "check",
    "prepare",
    "train",
    "cv",
    "predict",
    "evaluate",
    "animate",
    "compare",
]
SHAPE = (32, 32, 24)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three labeled phantoms and one test phantom; tests that alter it work on a copy."""
    root = tmp_path_factory.mktemp("cli") / "Task03_Liver"
    write_dataset(root, cases=3, shape=SHAPE, seed=0, test_cases=1)
    return root


@pytest.fixture
def checkpoint(tiny_checkpoint) -> Path:
    """An untrained two-level UNet3D saved as training saves it (tests/conftest.py)."""
    return tiny_checkpoint


def run(capsys, *argv) -> tuple[int, str, str]:
    """``liverseg ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    """The ``error:`` lines of stderr (progress bars also write there)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 2 with one ``error:`` line naming each fragment, and no traceback."""
    assert code == 2, err
    errors = error_lines(err)
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0]


def copy_dataset(dataset: Path, tmp_path: Path) -> Path:
    copy = tmp_path / dataset.name
    shutil.copytree(dataset, copy)
    return copy


def predictions_of(dataset: Path, folder: Path) -> Path:
    """The truths of ``dataset`` renamed as ``liverseg predict`` names its outputs."""
    folder.mkdir()
    for label in sorted((dataset / "labelsTr").glob("*.nii.gz")):
        shutil.copy(label, folder / label.name.replace(".nii.gz", "_seg.nii.gz"))
    return folder


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: liverseg {command}" in capsys.readouterr().out


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "{" + ",".join(SUBCOMMANDS) + "}" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: command"),
        (["segment"], "invalid choice: 'segment'"),
        (["check"], "the following arguments are required: data_dir"),
        (["predict", "ct.nii.gz", "--out", "o"], "required: --checkpoint"),
        (["phantoms", "out", "--cases", "many"], "argument --cases: invalid int value: 'many'"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: liverseg") and message in err


def test_phantoms_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "phantoms"
    code, stdout, _ = run(capsys, "phantoms", out, "--cases", 2, "--shape", 24, 24, 16)
    assert code == 0
    assert "wrote 2 phantom cases" in stdout
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [
        "liver_0.nii.gz",
        "liver_1.nii.gz",
    ]
    assert nib.load(str(out / "imagesTr" / "liver_0.nii.gz")).shape == (24, 24, 16)


def test_check_passes_good_phantoms(dataset, capsys):
    code, out, _ = run(capsys, "check", dataset)
    assert code == 0
    assert "0 errors" in out


def test_check_finds_a_broken_label(dataset, tmp_path, capsys):
    root = copy_dataset(dataset, tmp_path)
    (root / "labelsTr" / "liver_1.nii.gz").write_bytes(b"not a NIfTI file")
    code, out, err = run(capsys, "check", root)
    assert code == 1
    assert "1 errors" in out or "1 error" in out
    broken = [line for line in out.splitlines() if "liver_1.nii.gz" in line]
    assert broken and broken[0].startswith("error"), out
    assert "Traceback" not in err


def test_check_of_a_missing_folder_is_a_user_error(tmp_path, capsys):
    code, _, err = run(capsys, "check", tmp_path / "nowhere")
    assert_user_error(code, err, "nowhere")


def test_prepare_halves_every_axis(dataset, tmp_path, capsys):
    out = tmp_path / "prepared"
    code, _, _ = run(capsys, "prepare", dataset, out, "--workers", 1)
    assert code == 0
    image = nib.load(str(out / "imagesTr" / "liver_0.nii.gz"))
    assert image.shape == tuple(n // 2 for n in SHAPE)
    assert (out / "labelsTr" / "liver_2.nii.gz").is_file()


def test_prepare_of_a_missing_source_is_a_user_error(tmp_path, capsys):
    code, _, err = run(capsys, "prepare", tmp_path / "nowhere", tmp_path / "out", "--workers", 1)
    assert_user_error(code, err, "nowhere")
    assert not (tmp_path / "out" / "imagesTr").exists()


def test_train_refuses_an_unknown_key_naming_the_nearest(tmp_path, capsys):
    code, _, err = run(capsys, "train", "train.epoch=3", f"run.dir={tmp_path / 'run'}")
    assert_user_error(code, err, "train.epoch", "train.epochs")
    assert not (tmp_path / "run").exists()


def test_train_with_a_missing_config_file_is_a_user_error(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--config", tmp_path / "absent.yaml")
    assert_user_error(code, err, "absent.yaml")


def test_cv_refuses_folds_that_no_longer_match_the_dataset(dataset, tmp_path, capsys):
    root = copy_dataset(dataset, tmp_path)
    stale = root / "splits_2fold_seed0.json"
    stale.write_text(json.dumps([{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]))
    argv = ["cv", f"data.root={root}", f"run.dir={tmp_path / 'cv'}", "data.folds=2"]
    code, _, err = run(capsys, *argv, "data.factor=1", "data.shape=[32, 32, 24]")
    assert_user_error(code, err, str(stale), "no longer matches the dataset's cases", "delete it")
    assert not (tmp_path / "cv" / "fold_0").exists()
    code, _, err = run(capsys, *argv, "data.fold=2")
    assert_user_error(code, err, "data.fold=2 must be < data.folds=2")


def test_predict_writes_a_segmentation(dataset, checkpoint, tmp_path, capsys):
    ct = dataset / "imagesTs" / "liver_3.nii.gz"
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "predict", "--checkpoint", checkpoint, "--out", out, "--device", "cpu", ct
    )
    assert code == 0, err
    seg = nib.load(str(out / "liver_3_seg.nii.gz"))
    assert seg.shape == SHAPE
    np.testing.assert_allclose(seg.affine, nib.load(str(ct)).affine)
    assert json.loads((out / "liver_3_report.json").read_text())["case_id"] == "liver_3"


def test_predict_with_one_unreadable_input_exits_1(dataset, checkpoint, tmp_path, capsys):
    good = [dataset / "imagesTr" / f"liver_{i}.nii.gz" for i in (0, 1)]
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", checkpoint, "--out", out, "--device", "cpu"]
    code, _, err = run(capsys, *argv, good[0], bad, good[1])
    assert code == 1
    errors = error_lines(err)
    assert len(errors) == 1 and "broken.nii.gz" in errors[0], err
    assert (out / "liver_0_seg.nii.gz").is_file() and (out / "liver_1_seg.nii.gz").is_file()
    assert not (out / "broken_seg.nii.gz").exists()


def test_predict_with_a_missing_checkpoint_is_a_user_error(dataset, tmp_path, capsys):
    ct = dataset / "imagesTs" / "liver_3.nii.gz"
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", "--checkpoint", tmp_path / "absent.pt", "--out", out, ct)
    assert_user_error(code, err, "absent.pt")
    assert not (out / "liver_3_seg.nii.gz").exists()


def test_predict_with_a_garbage_checkpoint_is_a_user_error(dataset, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    ct = dataset / "imagesTs" / "liver_3.nii.gz"
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", "--checkpoint", garbage, "--out", out, ct)
    assert_user_error(code, err, "garbage.pt")
    assert not (out / "liver_3_seg.nii.gz").exists()


def test_predict_with_several_checkpoints_predicts_with_their_ensemble(
    dataset, checkpoint, tmp_path, capsys
):
    torch.manual_seed(1)
    other = write_tiny_checkpoint(tmp_path / "fold_1.pt", model=UNet3D(1, 2, features=(4, 8)))
    ct = dataset / "imagesTs" / "liver_3.nii.gz"
    out = tmp_path / "out"
    # The inputs may follow the checkpoints: values after the .pt files are inputs.
    argv = ["predict", "--device", "cpu", "--out", out, "--checkpoint", checkpoint, other, ct]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    report = json.loads((out / "liver_3_report.json").read_text())
    assert [m["checkpoint"] for m in report["model"]["ensemble"]] == [str(checkpoint), str(other)]


def test_predict_refuses_checkpoints_that_disagree(dataset, checkpoint, tmp_path, capsys):
    other = write_tiny_checkpoint(tmp_path / "fold_1.pt", factor=1)
    ct = dataset / "imagesTs" / "liver_3.nii.gz"
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", "--checkpoint", checkpoint, other, ct, "--out", out)
    assert_user_error(code, err, str(checkpoint), str(other), "data.factor")
    assert not (out / "liver_3_seg.nii.gz").exists()
    code, _, err = run(capsys, "predict", "--checkpoint", checkpoint, other, "--out", out)
    assert_user_error(code, err, "needs at least one input")


@pytest.mark.parametrize("flag, expected", [([], None), (["--no-skip-air"], False)])
def test_predict_skip_air_option_reaches_predict_paths(
    flag, expected, checkpoint, tmp_path, monkeypatch
):
    import liverseg.inference.batch

    seen = {}
    monkeypatch.setattr(
        liverseg.inference.batch, "predict_paths", lambda *a, **kw: seen.update(kw) or []
    )
    argv = ["predict", "--checkpoint", str(checkpoint), "ct.nii", "--out", str(tmp_path)]
    assert main([*argv, *flag]) == 0
    assert seen["skip_air_windows"] is expected


def test_evaluate_perfect_predictions(dataset, tmp_path, capsys):
    predictions = predictions_of(dataset, tmp_path / "pred")
    csv_path = tmp_path / "metrics.csv"
    code, out, err = run(capsys, "evaluate", predictions, dataset, "--out", csv_path)
    assert code == 0, err
    assert "liver_2" in out
    rows = csv_path.read_text().splitlines()
    assert any(row.startswith("liver_0,") for row in rows), rows


def test_evaluate_of_folders_that_do_not_pair_up_is_a_user_error(dataset, tmp_path, capsys):
    predictions = predictions_of(dataset, tmp_path / "pred")
    (predictions / "liver_1_seg.nii.gz").unlink()
    code, _, err = run(capsys, "evaluate", predictions, dataset)
    assert_user_error(code, err, "liver_1")


def test_animate_writes_a_gif(dataset, tmp_path, capsys):
    out = tmp_path / "case.gif"
    ct, truth = dataset / "imagesTr" / "liver_0.nii.gz", dataset / "labelsTr" / "liver_0.nii.gz"
    code, stdout, err = run(capsys, "animate", ct, "--truth", truth, "--out", out)
    assert code == 0, err
    assert stdout.strip() == f"wrote {out}"
    assert out.read_bytes()[:4] == b"GIF8"


def test_animate_refuses_an_unknown_suffix(dataset, tmp_path, capsys):
    out = tmp_path / "case.png"
    code, _, err = run(capsys, "animate", dataset / "imagesTr" / "liver_0.nii.gz", "--out", out)
    assert_user_error(code, err, ".png", ".gif", ".html")
    assert not out.exists()


def test_debug_shows_the_traceback_instead(tmp_path):
    from liverseg.errors import LiversegError

    with pytest.raises(LiversegError, match="nowhere"):
        main(["--debug", "check", str(tmp_path / "nowhere")])


CHECK_WITHOUT_TORCH = """
import runpy
import sys

sys.argv = ["liverseg", "check", "--help"]
try:
    runpy.run_module("liverseg", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    help_code = exc.code
from liverseg.cli import main

check_code = main(["check", DATASET])
print("help", help_code, "check", check_code, "torch", "torch" in sys.modules)
"""


def test_check_runs_without_importing_torch(dataset, tmp_path):
    script = CHECK_WITHOUT_TORCH.replace("DATASET", repr(str(dataset)))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage: liverseg check" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "help 0 check 0 torch False", result.stdout


# --- filesystem errors: one line naming the path and the fix, before the expensive work -------


def read_only(monkeypatch) -> None:
    """Make every new file fail as on a read-only filesystem (chmod does not stop root)."""

    def refuse(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(dir) / ".probe"))

    monkeypatch.setattr("tempfile.mkstemp", refuse)


def test_predict_out_that_is_a_file_is_refused_before_the_checkpoint_loads(
    dataset, tmp_path, capsys
):
    out = tmp_path / "preds"
    out.write_text("a file")
    garbage = tmp_path / "garbage.pt"  # would be the error if the checkpoint were loaded first
    garbage.write_bytes(b"not a checkpoint")
    ct = dataset / "imagesTs" / "liver_3.nii.gz"
    code, _, err = run(capsys, "predict", "--checkpoint", garbage, "--out", out, ct)
    assert_user_error(code, err, f"--out {out} is a file", "give a folder")
    assert "garbage.pt" not in err


def test_predict_out_on_a_read_only_disk(dataset, checkpoint, tmp_path, capsys, monkeypatch):
    read_only(monkeypatch)
    out = tmp_path / "preds"
    ct = dataset / "imagesTs" / "liver_3.nii.gz"
    code, _, err = run(capsys, "predict", "--checkpoint", checkpoint, "--out", out, ct)
    assert_user_error(code, err, str(out), "Read-only file system", "writable disk")
    assert not out.exists()


def test_evaluate_out_that_is_a_folder_is_refused_before_evaluating(
    dataset, tmp_path, capsys, monkeypatch
):
    predictions = predictions_of(dataset, tmp_path / "pred")
    monkeypatch.setattr("liverseg.evaluation.folders.pair_cases", None)  # never reached
    code, out, err = run(capsys, "evaluate", predictions, dataset, "--out", tmp_path)
    assert_user_error(code, err, f"--out {tmp_path} is a folder", "metrics.csv")
    assert out == ""


def test_evaluate_prints_its_table_when_the_csv_cannot_be_written(
    dataset, tmp_path, capsys, monkeypatch
):
    predictions = predictions_of(dataset, tmp_path / "pred")
    csv_path = tmp_path / "results" / "metrics.csv"

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))

    monkeypatch.setattr("liverseg.io.files.os.replace", disk_full)  # after the early check passed
    code, out, err = run(capsys, "evaluate", predictions, dataset, "--out", csv_path)
    assert_user_error(code, err, f"metrics CSV {csv_path}: No space left on device", "free space")
    assert "liver_2" in out and "global Dice" in out  # the computed table is not lost
    assert list((tmp_path / "results").iterdir()) == []  # no CSV, no temporary file


def test_animate_out_in_an_unwritable_place_is_refused_before_rendering(
    dataset, tmp_path, capsys, monkeypatch
):
    blocker = tmp_path / "figures"
    blocker.write_text("a file")
    monkeypatch.setattr("liverseg.visualize.animate", None)  # never reached
    ct = dataset / "imagesTr" / "liver_0.nii.gz"
    code, _, err = run(capsys, "animate", ct, "--out", blocker / "case.gif")
    assert_user_error(code, err, str(blocker / "case.gif"), f"{blocker} is a file")
    read_only(monkeypatch)
    code, _, err = run(capsys, "animate", ct, "--out", tmp_path / "case.gif")
    assert_user_error(code, err, str(tmp_path / "case.gif"), "Read-only file system")


def test_prepare_out_that_is_a_file_is_a_user_error(dataset, tmp_path, capsys):
    out = tmp_path / "prepared"
    out.write_text("a file")
    code, _, err = run(capsys, "prepare", dataset, out, "--workers", 1)
    assert_user_error(code, err, f"OUT_DIR {out} is a file")
    assert out.read_text() == "a file"


def test_train_refuses_an_unwritable_run_dir_before_making_phantoms(tmp_path, capsys, monkeypatch):
    run_dir, root = tmp_path / "run", tmp_path / "phantoms"
    run_dir.write_text("a file")
    argv = ["train", f"run.dir={run_dir}", f"data.root={root}", "phantoms.cases=4"]
    argv.append("data.num_train=3")
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, f"run.dir {run_dir} is a file")
    run_dir.unlink()
    read_only(monkeypatch)
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, f"run.dir {run_dir}: Read-only file system")
    assert not root.exists() and not run_dir.exists()


def test_a_full_disk_while_training_keeps_the_last_checkpoint(
    dataset, tmp_path, capsys, monkeypatch
):
    from liverseg import checkpoints

    real_save = checkpoints.torch.save

    def full_at_epoch_2(state, handle):
        if state["epoch"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), handle.name)
        real_save(state, handle)

    monkeypatch.setattr(checkpoints.torch, "save", full_at_epoch_2)
    run_dir = tmp_path / "run"
    code, _, err = run(
        capsys, "train", f"run.dir={run_dir}", f"data.root={dataset}", "data.num_train=2",
        "data.factor=1", f"data.shape={list(SHAPE)}", "data.patch_size=16", "data.num_workers=0",
        "data.queue_length=4", "data.samples_per_volume=2", "model.features=[4, 8]",
        "train.epochs=2", "train.val_every=1", "inference.batch_size=8",
    )  # fmt: skip
    last = run_dir / "checkpoints" / "last.pt"
    assert_user_error(code, err, f"checkpoint {last}: No space left on device", "free space")
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]


def test_a_filesystem_error_anywhere_is_one_line(tmp_path, capsys, monkeypatch):
    target = tmp_path / "ph" / "imagesTr" / "liver_0.nii.gz"
    temporary = target.with_name(".liver_0.nii.gz.k3j4h5g6.tmp.nii.gz")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temporary))

    monkeypatch.setattr("liverseg.phantoms.write_dataset", disk_full)
    code, _, err = run(capsys, "phantoms", tmp_path / "ph")
    assert_user_error(code, err, f"error: {target}: No space left on device; free space")
    with pytest.raises(OSError, match="No space left"):
        main(["--debug", "phantoms", str(tmp_path / "ph")])


def test_an_os_error_that_is_not_about_the_filesystem_is_not_hidden(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "x")

    monkeypatch.setattr("liverseg.phantoms.write_dataset", broken)
    with pytest.raises(OSError, match="Input/output error"):
        main(["phantoms", str(tmp_path / "ph")])


def test_predict_with_a_checkpoint_folder_lists_its_checkpoints(
    dataset, checkpoint, tmp_path, capsys
):
    run_dir = tmp_path / "myrun"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, run_dir / "checkpoints" / "best.pt")
    ct = dataset / "imagesTs" / "liver_3.nii.gz"
    code, _, err = run(capsys, "predict", "--checkpoint", run_dir, "--out", tmp_path / "o", ct)
    assert_user_error(
        code, err, f"checkpoint {run_dir} is a folder", str(run_dir / "checkpoints" / "best.pt")
    )
