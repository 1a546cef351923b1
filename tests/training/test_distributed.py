"""Training under torchrun on CPU (gloo, 2 processes): the same steps as one process of the global
batch, rank 0 alone writing the run folder, a dead rank ending the run, resumes across world sizes.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import tiny_runs
import torch
import torch.multiprocessing as mp
import torchio as tio

from liverseg.checkpoints import load_checkpoint, load_model
from liverseg.config import load_config
from liverseg.constants import CASE_ID, IMAGE, LABEL
from liverseg.data.cases import find_cases
from liverseg.data.splits import validation_cases
from liverseg.errors import ConfigError, DataError, TrainingError
from liverseg.inference.volume import predict_volume
from liverseg.training import distributed
from liverseg.training.cache import find_cached
from liverseg.training.cv import cross_validate
from liverseg.training.fit import fit, train_one_epoch, validate
from liverseg.training.loader import RankShareSampler
from liverseg.training.preflight import check_world_size
from liverseg.training.run_start import build_training_state, seed_everything

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    return tiny_runs.write_phantoms(tmp_path_factory)


# A safety net against a hung launch, not a speed limit: the runs take seconds.
LAUNCH_TIMEOUT_S = 240


def tiny_overrides(root, run_dir, *extra):
    """The tiny run of one epoch of two iterations, batch 1 per process."""
    return tiny_runs.tiny_overrides(
        root, run_dir, "data.batch_size=1", "train.iterations_per_epoch=2", *extra, epochs=1
    )


def torchrun(script: Path, *args, env_extra=None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 SCRIPT ARGS``.

    ``--standalone``: the launcher's store listens on a port the system gives it (port 0) and
    the ranks join that store, so no port is picked, released and taken by another test run
    before it is bound (as ``--master_port`` of a port found free would be).
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(script), *map(str, args),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=REPO
    )


def read_rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


# ---- the same steps as one process of the global batch (mp.spawn, fixed batches) ----

LOSSES = ("bce", "bce_dice")  # bce_dice: the batch Dice sums run over both ranks
LR = 0.01


def fixed_batches(steps: int, size: int = 16) -> list[dict]:
    """``steps`` batches of 2 patches; patch 1 of step 2 is NaN, so that step's loss is not finite
    in one process, and on rank 1 only under DDP (with ``bce``)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for step in range(steps):
        image = torch.rand(2, 1, size, size, size, generator=generator) * 2 - 1
        label = torch.randint(0, 3, (2, 1, size, size, size), generator=generator).to(torch.uint8)
        if step == 1:
            image[1] = float("nan")
        batches.append({IMAGE: {tio.DATA: image}, LABEL: {tio.DATA: label}, CASE_ID: ["a", "b"]})
    return batches


def rank_batches(batches: list[dict], rank: int, world: int) -> list[dict]:
    """Rank ``rank``'s part of each batch: patches ``rank``, ``rank + world``, ..."""
    return [
        {
            IMAGE: {tio.DATA: b[IMAGE][tio.DATA][rank::world]},
            LABEL: {tio.DATA: b[LABEL][tio.DATA][rank::world]},
            CASE_ID: b[CASE_ID][rank::world],
        }
        for b in batches
    ]


def train_fixed(batches: list[dict], loss: str, model_wrapper=lambda m, d: m):
    """Seeded tiny model trained on ``batches``, one Adam step each: (model, mean loss)."""
    config = load_config(
        None,
        (
            "model.features=[4, 8]", f"train.loss={loss}", f"train.lr={LR}",
            f"train.iterations_per_epoch={len(batches)}", "train.max_nonfinite=3",
        ),
    )  # fmt: skip
    device = torch.device("cpu")
    seed_everything(0)
    model, optimizer, scaler = build_training_state(config, device, None)
    mean = train_one_epoch(
        model_wrapper(model, device), batches, optimizer, scaler,
        epoch=1, config=config, device=device, dtype=None,
    )  # fmt: skip
    return model, mean


def ddp_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LIVERSEG_DIST_TIMEOUT_S="60"
    )
    torch.set_num_threads(1)
    # A file of this test's own, not a port found free: a port is released before rank 0 binds
    # it, and another run's process (or store) can take it in between; then one rank fails to
    # bind while the other joins a stranger's store, and gloo aborts (SIGABRT).
    distributed.init_from_env("cpu", init_method=f"file://{rendezvous}")
    mine = rank_batches(fixed_batches(3), rank, world)
    for loss in LOSSES:
        model, mean = train_fixed(mine, loss, distributed.wrap_model)
        torch.save({"model": model.state_dict(), "loss": mean}, Path(out) / f"{loss}{rank}.pt")
    try:
        distributed.run_on_main(refuse_on_rank_0)
    except DataError as error:
        Path(out, f"error{rank}.txt").write_text(str(error))


def refuse_on_rank_0():
    raise DataError(f"no dataset (found by rank {distributed.rank()})")


def test_two_ranks_of_batch_1_step_as_one_process_of_batch_2(tmp_path):
    rendezvous = tmp_path / "rendezvous"
    mp.spawn(ddp_worker, args=(2, str(rendezvous), str(tmp_path)), nprocs=2, join=True)
    seed_everything(0)
    config = load_config(None, ("model.features=[4, 8]",))
    fresh = build_training_state(config, torch.device("cpu"), None)[0].state_dict()
    for loss in LOSSES:
        model, mean = train_fixed(fixed_batches(3), loss)
        weights = model.state_dict()
        assert any(not torch.equal(v, fresh[k]) for k, v in weights.items())  # it trained
        for rank in (0, 1):
            saved = torch.load(tmp_path / f"{loss}{rank}.pt", weights_only=True)
            # Float noise through Adam moves a weight by < LR / 40; each rank training alone,
            # or a batch Dice of the rank's patches only, moves some by about 2 x LR.
            for key, value in weights.items():
                torch.testing.assert_close(saved["model"][key], value, rtol=0, atol=LR / 5)
            # the NaN step was skipped by both ranks: the mean of the other two steps' losses
            assert saved["loss"] == pytest.approx(mean, rel=1e-5)
    # rank 0's error in the work it does alone is raised on every rank
    for rank in (0, 1):
        assert (tmp_path / f"error{rank}.txt").read_text() == "no dataset (found by rank 0)"


# ---- whole runs under torchrun ----

# Runs ``liverseg train ARGS`` with every atomic write (os.replace onto its destination) logged
# to LOG as "RANK PATH": the test counts who wrote what.
TRAIN_LOGGING_WRITES = """
import os
import sys

log_path = sys.argv[1]
replace = os.replace


def logged_replace(src, dst, *args, **kwargs):
    replace(src, dst, *args, **kwargs)
    with open(log_path, "a") as log:
        log.write(f"{os.environ['RANK']} {dst}\\n")


os.replace = logged_replace
from liverseg.cli import main

sys.exit(main(["train", *sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def ddp_run(phantom_root, tmp_path_factory):
    """A 2-process run of 1 epoch, 2 training and 2 validation cases, with final predictions:
    (run folder, writes, torchrun result)."""
    folder = tmp_path_factory.mktemp("ddp")
    script, writes = folder / "train.py", folder / "writes.txt"
    script.write_text(TRAIN_LOGGING_WRITES)
    run_dir = folder / "run"
    overrides = tiny_overrides(
        phantom_root, run_dir, "data.num_train=2", "run.final_predictions=true"
    )
    result = torchrun(script, writes, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split(" ", 1) for line in writes.read_text().splitlines()]
    return run_dir, [(int(rank), Path(path)) for rank, path in lines], result


def test_two_process_run_writes_each_file_once_from_rank_0(ddp_run):
    run_dir, writes, result = ddp_run
    counts = Counter(path.relative_to(run_dir).as_posix() for _, path in writes)
    # 1 epoch: each file once; `liverseg predict` rewrites its summary after each case
    assert [path for path, n in counts.items() if n != 1] == ["predictions/summary.csv"]
    outside_cache = {(rank, p.relative_to(run_dir).as_posix()) for rank, p in writes}
    outside_cache = {(r, p) for r, p in outside_cache if not p.startswith("cache/")}
    assert {r for r, _ in outside_cache} == {0}
    names = {p for _, p in outside_cache}
    for name in ("config.yaml", "split.json", "metrics.csv", "curves.png", "animation.html"):
        assert name in names
    assert {"checkpoints/last.pt", "checkpoints/best.pt"} <= names
    assert any(p.startswith("predictions/") and p.endswith("_seg.nii.gz") for p in names)
    # each rank preprocessed its share of the 2 training cases: 4 files per case (image, label,
    # class locations, meta), once each
    cache = [(rank, p) for rank, p in writes if p.parent.name == "cache"]
    assert Counter(rank for rank, _ in cache) == {0: 4, 1: 4}
    assert "global batch 2 (1 x 2)" in result.stderr
    assert "rank 1 of 2" in result.stderr and "rank 0 of 2" in result.stderr
    assert [r["epoch"] for r in read_rows(run_dir)] == ["1"]


def test_two_process_checkpoint_loads_and_predicts_in_one_cpu_process(ddp_run, phantom_root):
    run_dir, _, _ = ddp_run
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["world_size"] == 2
    assert not any(key.startswith("module.") for key in state["model"])
    model, settings = load_model(run_dir / "checkpoints" / "last.pt", "cpu")
    image = phantom_root / "imagesTr" / "liver_0.nii.gz"
    assert predict_volume(model, image, settings, prepared=True).labels.shape == (40, 40, 32)


def test_validation_split_over_ranks_logs_one_process_dice(ddp_run, phantom_root):
    run_dir, _, _ = ddp_run
    model, settings = load_model(run_dir / "checkpoints" / "last.pt", "cpu")
    val_ids = validation_cases(run_dir / "split.json")
    cases = [c for c in find_cases(phantom_root, split="training") if c.case_id in val_ids]
    assert len(cases) == 2  # one validated by each rank
    scores = validate(model, cases, settings, torch.device("cpu"))
    (row,) = read_rows(run_dir)
    for name, value in scores.items():
        assert row[f"dice_{name}"] == f"{value:.4f}"


def test_two_process_checkpoint_resumes_in_one_process(ddp_run, phantom_root, tmp_path, caplog):
    run_dir = shutil.copytree(ddp_run[0], tmp_path / "run")
    with caplog.at_level("INFO", logger="liverseg"):
        overrides = tiny_overrides(phantom_root, run_dir, "data.num_train=2", "train.epochs=2")
        fit(load_config(None, overrides))
    assert any(
        "trained by 2 process(es), this run has 1: the global batch goes from 2 to 1" in r.message
        for r in caplog.records
    )
    assert [r["epoch"] for r in read_rows(run_dir)] == ["1", "2"]
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["world_size"] == 1
    # 2 iterations per epoch: the optimizer state came from the 2-process checkpoint
    assert int(state["optimizer"]["state"][0]["step"]) == 4


def test_one_process_run_resumes_under_torchrun(phantom_root, tmp_path):
    run_dir = tmp_path / "run"
    fit(load_config(None, tiny_overrides(phantom_root, run_dir, "train.val_every=5")))
    first = read_rows(run_dir)
    result = torchrun(REPO / "main.py", *tiny_overrides(phantom_root, run_dir, "train.epochs=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained by 1 process(es), this run has 2" in result.stderr
    rows = read_rows(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == first[0]
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and int(state["optimizer"]["state"][0]["step"]) == 4


# Runs ``liverseg train ARGS``; rank 1 kills itself (SIGKILL) when its first epoch starts.
TRAIN_RANK_1_DIES = """
import os
import signal
import sys

import liverseg.training.fit as fit_module
from liverseg.cli import main

train_one_epoch = fit_module.train_one_epoch


def die_on_rank_1(*args, **kwargs):
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return train_one_epoch(*args, **kwargs)


fit_module.train_one_epoch = die_on_rank_1
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_dead_rank_ends_the_run_with_an_error(phantom_root, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_RANK_1_DIES)
    run_dir = tmp_path / "run"
    result = torchrun(script, *tiny_overrides(phantom_root, run_dir))
    assert result.returncode != 0
    assert "Signal 9 (SIGKILL)" in result.stderr and "train.py FAILED" in result.stderr
    assert not (run_dir / "checkpoints" / "last.pt").exists()


# ---- the pieces ----


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.any_rank(True, "cpu") and distributed.share([1, 2, 3]) == [1, 2, 3]
    assert distributed.run_on_main(lambda: 7) == 7 and distributed.gather("x") == ["x"]


@pytest.mark.parametrize("device", ["cuda:1", "mps"])
def test_a_device_that_names_one_gpu_is_refused_under_torchrun(monkeypatch, device):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=rf"train.device='{device}' under torchrun"):
        distributed.init_from_env(device)


def test_world_size_without_torchrun_is_one_clear_error(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TrainingError, match=r"MASTER_ADDR=\(unset\).*unset WORLD_SIZE"):
        distributed.init_from_env("cpu")
    assert not distributed.is_distributed()


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf"])
def test_a_bad_timeout_variable_is_refused(monkeypatch, value):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, value)
    with pytest.raises(ConfigError, match=rf"{distributed.TIMEOUT_ENV}='{value}'"):
        distributed.timeout_s(distributed.TIMEOUT_ENV, 300)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "42.5")
    assert distributed.timeout_s(distributed.TIMEOUT_ENV, 300) == 42.5


def test_more_processes_than_training_cases_are_refused():
    check_world_size(3, 3)
    with pytest.raises(TrainingError, match="4 processes cannot share 3 training case"):
        check_world_size(3, 4)


def test_rank_shares_cover_every_case_and_change_with_each_pass():
    dataset = list(range(7))
    samplers = [RankShareSampler(dataset, 2, rank, seed=0) for rank in (0, 1)]
    for sampler in samplers:
        sampler.set_epoch(3)
    first = [list(s) for s in samplers]
    second = [list(s) for s in samplers]
    for shares in (first, second):
        assert len(shares[0]) == len(shares[1]) == 4  # 7 cases padded to 8
        assert set(shares[0]) | set(shares[1]) == set(dataset)
    assert first != second  # a second pass of the same epoch is a new order
    for sampler in samplers:
        sampler.set_epoch(3)
    assert [list(s) for s in samplers] == first  # reproducible from (seed, epoch, pass)


def test_a_cache_entry_no_rank_wrote_names_the_shared_folder_fix(phantom_root, tmp_path):
    case = find_cases(phantom_root, split="training")[0]
    with pytest.raises(DataError, match=r"liver_0 is not whole in .*every node sees"):
        find_cached(case, tmp_path, {"hu_min": -150})


def test_cross_validation_under_torchrun_is_refused(phantom_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = load_config(None, tiny_overrides(phantom_root, tmp_path / "cv", "data.folds=2"))
    with pytest.raises(TrainingError, match="liverseg cv does not run under torchrun yet"):
        cross_validate(config)
