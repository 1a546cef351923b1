"""`liverseg predict --workers N` and under torchrun: shares, part files, the merged summary."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_tiny_checkpoint

import liverseg.inference.batch as batch
from liverseg.cli import main
from liverseg.errors import LiversegError, WorkerError
from liverseg.inference.batch import predict_paths
from liverseg.inference.summary import SUMMARY_COLUMNS, part_path, summary_parts, write_summary
from liverseg.inference.workers import split_shares, worker_devices, worker_threads
from liverseg.io import list_nifti, temp_destination

torch.set_num_threads(1)  # as each of 2 workers on 2 cores: the same arithmetic in every run

REPO = Path(__file__).resolve().parents[2]
GOOD = [f"liver_{k}" for k in range(4)]


def write_ct(path: Path, shape: tuple[int, int, int], seed: int) -> Path:
    hu = np.random.default_rng(seed).normal(50, 80, size=shape).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 2.5, 1.0])), str(path))
    return path


def read_summary(out: Path) -> dict[str, dict]:
    with (out / "summary.csv").open(newline="") as f:
        return {row["case_id"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4 tiny CTs and one unreadable file, predicted by 1 process and by `--workers 2` (CLI)."""
    root = tmp_path_factory.mktemp("workers")
    checkpoint = write_tiny_checkpoint(root / "best.pt")
    folder = root / "in"
    good = [write_ct(folder / f"{n}.nii.gz", (20 + 2 * k, 18, 12), k) for k, n in enumerate(GOOD)]
    bad = folder / "bad.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    one, two = root / "one", root / "two"
    one_failures = predict_paths(checkpoint, [folder], one, device="cpu")
    merged, merge = [], batch.merge_summary_parts
    stderr = io.StringIO()
    argv = ["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(two)]
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        spy = lambda out: merged.append(summary_parts(out)) or merge(out)  # noqa: E731
        patch.setattr(batch, "merge_summary_parts", spy)
        code = main([*argv, "--device", "cpu", "--workers", "2"])
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
    return SimpleNamespace(
        checkpoint=checkpoint, good=good, bad=bad, one=one, two=two,
        one_failures=one_failures, code=code, errors=errors, merged=merged,
    )  # fmt: skip


def test_two_workers_predict_what_one_process_does(runs):
    outs = (runs.one, runs.two)
    for name in GOOD:
        labels = [np.asarray(nib.load(str(o / f"{name}_seg.nii.gz")).dataobj) for o in outs]
        np.testing.assert_array_equal(*labels)
        reports = [json.loads((o / f"{name}_report.json").read_text()) for o in outs]
        assert reports[0] == reports[1]
    rows = [read_summary(o) for o in outs]
    for row in [*rows[0].values(), *rows[1].values()]:
        row.pop("seconds"), row.pop("worker")
    assert rows[0] == rows[1]


def test_the_summary_is_merged_once_with_every_case_and_its_worker(runs):
    # Once at the start (nothing left by a killed run), once at the end: both workers' parts.
    assert [[p.name for p in parts] for parts in runs.merged] == [
        [], ["summary.csv.part0", "summary.csv.part1"]
    ]  # fmt: skip
    with (runs.two / "summary.csv").open() as f:
        header = f.readline().strip().split(",")
    assert header == list(SUMMARY_COLUMNS)
    assert header[header.index("seconds") + 1] == "worker" and header[-1] == "warnings"
    rows = read_summary(runs.two)
    assert set(rows) == {*GOOD, "bad"}
    assert {row["worker"] for row in rows.values()} == {"0/cpu", "1/cpu"}
    assert {row["worker"] for row in read_summary(runs.one).values()} == {"0/cpu"}
    assert summary_parts(runs.two) == []
    assert not [p for p in runs.two.iterdir() if ".tmp" in p.name or ".part" in p.name]


def test_a_bad_input_in_one_share_fails_alone(runs):
    assert runs.code == 1
    assert len(runs.errors) == 1 and runs.errors[0].startswith(f"error: {runs.bad}: DataError")
    assert [(path, message) for path, message in runs.one_failures] == [
        (runs.bad, runs.errors[0].removeprefix(f"error: {runs.bad}: "))
    ]
    rows = read_summary(runs.two)
    assert rows["bad"]["status"].startswith("failed: DataError")
    assert rows["bad"]["worker"] in {"0/cpu", "1/cpu"}
    assert all(rows[name]["status"] == "ok" for name in GOOD)
    assert sorted(p.name for p in list_nifti(runs.two)) == [f"{n}_seg.nii.gz" for n in GOOD]


def test_a_rerun_skips_and_merges_the_part_a_killed_run_left(runs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(runs.two, out)
    rows = read_summary(out)
    # As a run killed before its merge leaves it: liver_1's row only in worker 1's part.
    write_summary(part_path(out, 1), {"liver_1": rows.pop("liver_1")})
    write_summary(out / "summary.csv", rows)
    failures = predict_paths(runs.checkpoint, runs.good, out, device="cpu", workers=2)
    assert [path for path, _ in failures] == runs.good
    assert all("exists; pass --overwrite" in message for _, message in failures)
    merged = read_summary(out)
    assert merged["liver_1"] == read_summary(runs.two)["liver_1"]  # not "skipped: ..."
    assert merged == read_summary(runs.two)
    assert summary_parts(out) == []


def test_a_worker_that_dies_ends_the_run_naming_it(runs, tmp_path):
    out, raised = tmp_path / "out", []

    def predict():
        try:
            predict_paths(runs.checkpoint, runs.good, out, device="cpu", workers=2)
        except Exception as exc:  # noqa: BLE001 - checked below
            raised.append(exc)

    thread = threading.Thread(target=predict)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        victims = [p for p in multiprocessing.active_children() if p.name == "liverseg-worker-1"]
        if victims:
            os.kill(victims[0].pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], WorkerError)
    assert "worker 1/cpu died (killed by SIGKILL)" in str(raised[0])
    assert raised[0].failures == []  # no input failed in the worker that finished
    rows = read_summary(out)  # worker 0's cases, merged
    assert rows and {row["worker"] for row in rows.values()} == {"0/cpu"}
    for name, row in rows.items():
        assert row["status"] == "ok" and (out / f"{name}_seg.nii.gz").is_file()
    assert summary_parts(out) == []


def test_torchrun_ranks_share_the_cases(runs, tmp_path):
    out = tmp_path / "out"
    command = [
        # --standalone: the launcher's store takes a port the system gives it, none found free
        # and released first, which another test run could take in between.
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "liverseg", "predict",
        "--checkpoint", str(runs.checkpoint), *map(str, runs.good[:3]), "--out", str(out),
        "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_summary(out)
    assert set(rows) == set(GOOD[:3]) and {r["status"] for r in rows.values()} == {"ok"}
    assert {row["worker"] for row in rows.values()} == {"0/cpu", "1/cpu"}
    for name in GOOD[:3]:
        expected = nib.load(str(runs.one / f"{name}_seg.nii.gz")).dataobj
        labels = nib.load(str(out / f"{name}_seg.nii.gz")).dataobj
        np.testing.assert_array_equal(np.asarray(labels), np.asarray(expected))
    assert summary_parts(out) == []


def test_shares_are_balanced_by_bytes_and_deterministic():
    assert split_shares([5, 1, 1, 3, 0], 2) == [[0, 4], [1, 2, 3]]
    assert split_shares([1, 1, 1, 1], 2) == [[0, 2], [1, 3]]
    assert split_shares([7], 3) == [[0], [], []]
    assert worker_devices("cpu", 3) == ["cpu", "cpu", "cpu"]
    if not torch.cuda.is_available():
        assert worker_devices("auto", 2) == ["cpu", "cpu"]
    assert worker_threads(10**6) == 1


def test_part_files_are_neither_temp_files_nor_volumes(tmp_path):
    parts = [part_path(tmp_path, k) for k in (10, 2, 0)]
    for part in parts:
        write_summary(part, {})
        assert temp_destination(part) is None
    (tmp_path / "summary.csv.partx").write_text("not a part")
    assert summary_parts(tmp_path) == sorted(parts, key=lambda p: int(p.name.split("part")[1]))
    assert list_nifti(tmp_path) == []


def test_workers_are_refused_below_one_and_under_torchrun(runs, tmp_path, monkeypatch, capsys):
    argv = ["predict", "--checkpoint", str(runs.checkpoint), str(runs.good[0])]
    assert main([*argv, "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "--workers: expected an integer >= 1, found 0" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LiversegError, match="under torchrun"):
        predict_paths(runs.checkpoint, runs.good, tmp_path / "o", workers=2)
