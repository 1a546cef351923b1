"""The full-size path: the users' default pipeline at Task03 sizes, each stage's time and peak RAM.

Run (about 45 minutes on 2 CPU cores with one torch thread)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/full_size.py [--work data/full_size]
        [--cases 4] [--keep] [--stages phantoms check prepare train predict animate]

Stages, each in its own subprocess (``--stages`` runs a subset; a stage reads what the earlier
ones wrote under ``--work``, and removes its own earlier output first, so it always does its
whole work):

1. ``phantoms``: ``--cases`` labeled cases of 512 x 512 x 300 at 0.70-0.80 mm in-plane and
   1.0-2.5 mm slices (``liverseg.phantoms.generate_case`` with a chosen field of view), and one
   unlabeled 512 x 512 x 500 scan (0.75 x 0.75 x 1.0 mm) in ``imagesTs``, in the Task03 layout
   (``imagesTr``/``labelsTr``/``imagesTs``, ``dataset.json``). ``--keep`` reuses them.
2. ``check``: ``liverseg check DATA``.
3. ``prepare``: ``liverseg prepare DATA DATA_half --workers 1`` (the seed's halving; one worker,
   in-process, so that one heavy process runs at a time: each further worker holds one more
   case).
4. ``train``: ``python main.py`` with ``configs/default.yaml`` unchanged except
   ``data.root``, ``data.num_train`` (all cases but one), one epoch of 4 iterations, validation
   after it, ``run.dir``, no final predictions, on the CPU: the default queue (40 patches, 5 per
   volume, 2 DataLoader workers), 96^3 patches, batch 2, the default UNet.
5. ``predict``: ``liverseg predict --checkpoint <run>/checkpoints/last.pt`` of the original
   512 x 512 x 500 scan (the checkpoint's factor 2 reduces it and maps the labels back); its
   report's figures are printed after the table.
6. ``animate``: ``liverseg animate`` of that scan and its prediction to an ``.html``.

Measured per stage:

- wall seconds of the subprocess;
- ``time -v``: GNU time's "Maximum resident set size", the kernel's high-water mark of the
  largest single process of the stage (the command, or a child it waited for), not a sum;
- tree RSS and tree PSS: the stage's processes (the command and every descendant: DataLoader
  workers, prepare workers) polled with psutil every ``POLL_S`` seconds, their RSS summed, and
  their PSS summed (pages shared between them, e.g. by forked workers, counted once). A spike
  shorter than the polling interval can escape the tree figures, never ``time -v``'s. RSS
  includes the pages of memory-mapped files (the training cache) the process has touched;
- swap: the machine's swap size, the pages swapped in and out during the stage
  (``/proc/vmstat`` pswpin/pswpout), and the lowest ``MemAvailable`` seen while it ran.

The issue's targets are printed beside the figures: the whole pipeline without swapping on a
24 GB machine; the training process tree under 8 GiB; predicting the 512 x 512 x 500 scan under
6 GiB (compared against the tree RSS, the larger figure). The model is trained for 4 iterations:
its segmentation means nothing; this measures the path, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

STAGES = ("phantoms", "check", "prepare", "train", "predict", "animate")
CASE_SHAPE = (512, 512, 300)
SCAN_SHAPE = (512, 512, 500)
# Fields of view (mm) of the labeled cases, in turn: spacing = FOV / CASE_SHAPE.
CASE_FOVS_MM = (
    (384.0, 384.0, 450.0),  # 0.75 x 0.75 x 1.5 mm
    (358.4, 358.4, 300.0),  # 0.70 x 0.70 x 1.0 mm
    (409.6, 409.6, 750.0),  # 0.80 x 0.80 x 2.5 mm
    (396.8, 396.8, 600.0),  # 0.775 x 0.775 x 2.0 mm
)
SCAN_FOV_MM = (384.0, 384.0, 500.0)  # 0.75 x 0.75 x 1.0 mm
SEED = 0
ITERATIONS = 4
POLL_S = 0.2
MIB = 2**20
GIB = 2**30
TARGETS_GIB = {"train": 8.0, "predict": 6.0}
MACHINE_GIB = 24.0


@dataclass
class Usage:
    """What one stage used: seconds, exit code and memory figures (MiB)."""

    stage: str
    seconds: float
    returncode: int
    time_max_rss_mib: float
    tree_rss_mib: float
    tree_pss_mib: float
    processes: int
    min_available_mib: float
    swapped_pages: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "full_size")
    parser.add_argument("--cases", type=int, default=4, help="labeled cases (>= 2)")
    parser.add_argument("--keep", action="store_true", help="reuse phantoms already written")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--write-phantoms", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cases < 2:
        parser.error("--cases: expected >= 2 (one validates)")
    return args


class Paths:
    """Where each stage reads and writes, under ``--work``."""

    def __init__(self, work: Path, cases: int):
        self.work = work.resolve()
        self.data = self.work / "Task03"
        self.half = self.work / "Task03_half"
        self.run = self.work / "run"
        self.predictions = self.work / "predictions"
        self.scan_id = f"liver_{cases}"
        self.scan = self.data / "imagesTs" / f"{self.scan_id}.nii.gz"
        self.seg = self.predictions / f"{self.scan_id}_seg.nii.gz"
        self.report = self.predictions / f"{self.scan_id}_report.json"
        self.animation = self.work / f"{self.scan_id}.html"
        self.logs = self.work / "logs"


# --- stage 1, run in its own process: the phantoms ---------------------------------------------


def write_phantoms(paths: Paths, cases: int) -> None:
    """The labeled cases and the scan to predict, in the Task03 layout."""
    from liverseg.io import atomic_path, save_nifti
    from liverseg.phantoms import case_seed, generate_case

    training = []
    for index in range(cases):
        fov = CASE_FOVS_MM[index % len(CASE_FOVS_MM)]
        image, label, affine = generate_case(CASE_SHAPE, case_seed(SEED, index), fov_mm=fov)
        name = f"liver_{index}.nii.gz"
        save_nifti(image, affine, paths.data / "imagesTr" / name)
        save_nifti(label, affine, paths.data / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        print(f"liver_{index}: {CASE_SHAPE} at {spacing_text(fov, CASE_SHAPE)}", flush=True)
    image, _, affine = generate_case(SCAN_SHAPE, case_seed(SEED, cases), fov_mm=SCAN_FOV_MM)
    save_nifti(image, affine, paths.scan)
    print(f"{paths.scan_id}: {SCAN_SHAPE} at {spacing_text(SCAN_FOV_MM, SCAN_SHAPE)}", flush=True)
    manifest = {
        "name": "Liver",
        "description": "Synthetic abdominal CT phantoms at Task03 sizes (benchmarks/full_size.py)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": cases,
        "numTest": 1,
        "training": training,
        "test": [f"./imagesTs/{paths.scan.name}"],
    }
    with atomic_path(paths.data / "dataset.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=4) + "\n")


def spacing_text(fov_mm, shape) -> str:
    return " x ".join(f"{f / n:.3g}" for f, n in zip(fov_mm, shape)) + " mm"


def phantoms_exist(paths: Paths, cases: int) -> bool:
    names = [f"liver_{i}.nii.gz" for i in range(cases)]
    files = [paths.data / d / n for d in ("imagesTr", "labelsTr") for n in names]
    return all(f.exists() for f in [*files, paths.scan, paths.data / "dataset.json"])


# --- the stages' commands ------------------------------------------------------------------------


def stage_command(stage: str, paths: Paths, cases: int) -> list[str]:
    """The command line of one stage."""
    liverseg = [sys.executable, "-m", "liverseg"]
    if stage == "phantoms":
        script = str(Path(__file__).resolve())
        return [sys.executable, script, "--write-phantoms", "--work", str(paths.work),
                "--cases", str(cases)]  # fmt: skip
    if stage == "check":
        return [*liverseg, "check", str(paths.data)]
    if stage == "prepare":
        return [*liverseg, "prepare", str(paths.data), str(paths.half), "--workers", "1"]
    if stage == "train":
        return [sys.executable, str(ROOT / "main.py"), *training_overrides(paths, cases)]
    if stage == "predict":
        checkpoint = paths.run / "checkpoints" / "last.pt"
        return [*liverseg, "predict", "--checkpoint", str(checkpoint), str(paths.scan),
                "--out", str(paths.predictions), "--device", "cpu"]  # fmt: skip
    if stage == "animate":
        return [*liverseg, "animate", str(paths.scan), "--seg", str(paths.seg),
                "--out", str(paths.animation)]  # fmt: skip
    raise ValueError(stage)


def training_overrides(paths: Paths, cases: int) -> list[str]:
    """What a handful of iterations on these cases needs; every other key is the default."""
    return [
        f"data.root={paths.half}",
        f"data.num_train={cases - 1}",
        "train.epochs=1",
        f"train.iterations_per_epoch={ITERATIONS}",
        "train.val_every=1",
        "train.device=cpu",
        f"run.dir={paths.run}",
        "run.final_predictions=false",
    ]


def stage_output(stage: str, paths: Paths) -> Path | None:
    """What a stage writes, removed before it runs so that it does its whole work."""
    return {
        "phantoms": paths.data,
        "prepare": paths.half,
        "train": paths.run,
        "predict": paths.predictions,
        "animate": paths.animation,
    }.get(stage)


def remove(path: Path | None) -> None:
    if path is None or not path.exists():
        return
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


# --- measuring a stage ---------------------------------------------------------------------------


def vmstat_swapped() -> int:
    """Pages swapped in plus out since boot."""
    fields = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return int(fields.get("pswpin", 0)) + int(fields.get("pswpout", 0))


def tree_memory(root: psutil.Process) -> tuple[int, int, int]:
    """Summed RSS and PSS (bytes) of ``root``'s descendants, and how many there are."""
    rss = pss = count = 0
    try:
        children = root.children(recursive=True)
    except psutil.Error:
        return 0, 0, 0
    for child in children:
        try:
            info = child.memory_full_info()
        except psutil.Error:  # ended between the listing and the reading
            continue
        rss, pss, count = rss + info.rss, pss + info.pss, count + 1
    return rss, pss, count


def max_rss_of(time_output: Path) -> float:
    """GNU time's "Maximum resident set size (kbytes)", in MiB (NaN if absent)."""
    for line in time_output.read_text().splitlines():
        if "Maximum resident set size" in line:
            return int(line.rsplit(":", 1)[1]) / 1024
    return float("nan")


def run_stage(stage: str, command: list[str], logs: Path) -> Usage:
    """Run one stage under ``/usr/bin/time -v``, polling its process tree; its output to a log."""
    logs.mkdir(parents=True, exist_ok=True)
    time_file, log_file = logs / f"{stage}.time", logs / f"{stage}.log"
    swapped, start = vmstat_swapped(), time.perf_counter()
    peak_rss = peak_pss = peak_count = 0
    min_available = psutil.virtual_memory().available
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            ["/usr/bin/time", "-v", "-o", str(time_file), *command],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            rss, pss, count = tree_memory(root)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            peak_count = max(peak_count, count)
            min_available = min(min_available, psutil.virtual_memory().available)
            time.sleep(POLL_S)
    seconds = time.perf_counter() - start
    return Usage(
        stage, seconds, proc.returncode, max_rss_of(time_file), peak_rss / MIB, peak_pss / MIB,
        peak_count, min_available / MIB, vmstat_swapped() - swapped,
    )  # fmt: skip


def show_log_tail(stage: str, logs: Path, lines: int) -> None:
    tail = (logs / f"{stage}.log").read_text(errors="replace").splitlines()[-lines:]
    for line in tail:
        print(f"    | {line}")


# --- the table -----------------------------------------------------------------------------------


def target_text(usage: Usage) -> str:
    limit = TARGETS_GIB.get(usage.stage)
    if limit is None:
        return ""
    verdict = "met" if usage.tree_rss_mib < limit * 1024 and usage.returncode == 0 else "MISSED"
    return f"< {limit:g} GiB: {verdict}"


def print_table(usages: list[Usage]) -> None:
    print()
    print("| stage | exit | wall s | time -v max RSS, MiB | tree RSS, MiB | tree PSS, MiB "
          "| processes | lowest MemAvailable, MiB | pages swapped | target |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for u in usages:
        print(
            f"| {u.stage} | {u.returncode} | {u.seconds:.1f} | {u.time_max_rss_mib:.0f} "
            f"| {u.tree_rss_mib:.0f} | {u.tree_pss_mib:.0f} | {u.processes} "
            f"| {u.min_available_mib:.0f} | {u.swapped_pages} | {target_text(u)} |"
        )


def print_machine_verdict(usages: list[Usage]) -> None:
    """The whole-pipeline target: no swapping, nothing killed, every stage within the machine."""
    swap_total = psutil.swap_memory().total
    swap = f"{swap_total / GIB:.1f} GiB of swap" if swap_total else "no swap device (SwapTotal 0)"
    total = psutil.virtual_memory().total / GIB
    print(f"\nmachine: {total:.1f} GiB RAM, {swap}; pages swapped in+out during the stages: "
          f"{sum(u.swapped_pages for u in usages)}")  # fmt: skip
    if not swap_total:
        print("  without swap a stage that ran out of memory would have been killed, not swapped")
    failed = [u.stage for u in usages if u.returncode != 0]
    peak = max((u.tree_rss_mib for u in usages), default=0.0) / 1024
    fits = not failed and peak < MACHINE_GIB and sum(u.swapped_pages for u in usages) == 0
    print(f"target: the whole pipeline on {MACHINE_GIB:g} GB without swapping: "
          f"{'met' if fits else 'MISSED'} (largest stage tree RSS {peak:.2f} GiB"
          f"{'; failed: ' + ', '.join(failed) if failed else ''})")  # fmt: skip


def print_report(paths: Paths) -> None:
    """The figures of the report ``liverseg predict`` wrote."""
    if not paths.report.exists():
        return
    report = json.loads(paths.report.read_text())
    keys = ("spacing_mm", "liver_volume_ml", "tumor_burden_ml", "lesion_count", "qc", "warnings")
    print(f"\n{paths.report.relative_to(paths.work)} (a 4-iteration model: the figures mean "
          "nothing, the report's presence does):")  # fmt: skip
    for key in keys:
        if key in report:
            print(f"  {key}: {json.dumps(report[key])[:300]}")
    if paths.animation.exists():
        print(f"{paths.animation.relative_to(paths.work)}: "
              f"{paths.animation.stat().st_size / MIB:.1f} MiB")  # fmt: skip


# --- main ----------------------------------------------------------------------------------------


def print_header(args: argparse.Namespace, paths: Paths) -> None:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"full-size path under {paths.work}: {args.cases} cases of {CASE_SHAPE}, a scan of "
          f"{SCAN_SHAPE}; stages {' '.join(args.stages)}; OMP_NUM_THREADS={threads}; "
          f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip
    print(f"training overrides: {' '.join(training_overrides(paths, args.cases))}")


def run_stages(args: argparse.Namespace, paths: Paths) -> list[Usage]:
    usages = []
    for stage in (s for s in STAGES if s in args.stages):
        if stage == "phantoms" and args.keep and phantoms_exist(paths, args.cases):
            print(f"\n[phantoms] kept: {paths.data}")
            continue
        remove(stage_output(stage, paths))
        command = stage_command(stage, paths, args.cases)
        print(f"\n[{stage}] {' '.join(command)}", flush=True)
        usage = run_stage(stage, command, paths.logs)
        print(f"  {usage.seconds:.1f} s, exit {usage.returncode}, time -v max RSS "
              f"{usage.time_max_rss_mib:.0f} MiB, tree RSS {usage.tree_rss_mib:.0f} MiB "
              f"(log: {paths.logs / (stage + '.log')})", flush=True)  # fmt: skip
        show_log_tail(stage, paths.logs, lines=4)
        usages.append(usage)
        if usage.returncode and stage != "check":  # check: exit 1 lists the data's errors
            print(f"  [{stage}] failed: the stages after it are not run")
            break
    return usages


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = Paths(args.work, args.cases)
    if args.write_phantoms:
        write_phantoms(paths, args.cases)
        return 0
    print_header(args, paths)
    usages = run_stages(args, paths)
    print_table(usages)
    print_machine_verdict(usages)
    print_report(paths)
    return 0 if all(u.returncode == 0 for u in usages) else 1


if __name__ == "__main__":
    sys.exit(main())
