"""Phantom figures: seconds to generate one case; lesion contrast and sizes against real CT.

Usage:
    python benchmarks/phantoms.py [--shape 128 128 128] [--cases 5]
    python benchmarks/phantoms.py --lesions [--shape 96 96 64] [--cases 40] [--seed 21]
    python benchmarks/phantoms.py --lesions --folder DATASET [--before OLD_DATASET]

``--lesions`` measures every lesion on the scanned image (``liverseg.phantoms.statistics``) of
the cases ``liverseg phantoms OUT --cases N --shape ... --seed S`` writes (drawn in memory), or
of a dataset already written (``--folder``), and prints the figures beside their targets;
``--before`` adds a column measured on a dataset written by another version.
"""

from __future__ import annotations

import argparse
import statistics
import time

from liverseg.phantoms import case_seed, generate_case, render_case
from liverseg.phantoms.statistics import (
    DARK_HU,
    SMALL_MM,
    TARGETS,
    measure_folder,
    measure_lesions,
    summarize,
)
from liverseg.phantoms.tumors import KINDS

# figure -> (what it is, format); the order of the printed table.
_ROWS = {
    "cases": ("cases", "{:.0f}"),
    "tumor_free_share": ("tumor-free cases", "{:.0%}"),
    "lesions": ("lesions (26-connected components)", "{:.0f}"),
    "lesions_per_tumor_case": ("lesions per tumor case", "{:.2f}"),
    "mean_contrast_hu": ("tumor - liver HU, voxel-weighted", "{:+.1f}"),
    "lesion_contrast_hu": ("tumor - liver HU, median lesion", "{:+.1f}"),
    "contrast_p10_hu": ("  10th percentile lesion", "{:+.1f}"),
    "contrast_p90_hu": ("  90th percentile lesion", "{:+.1f}"),
    "dark_share": (f"lesions >= {DARK_HU:.0f} HU darker (dark)", "{:.0%}"),
    "subtle_share": (f"lesions 0-{DARK_HU:.0f} HU darker (subtle)", "{:.0%}"),
    "bright_share": ("lesions brighter than liver (bright)", "{:.0%}"),
    "small_share": (f"lesions < {SMALL_MM:.0f} mm (longest axial)", "{:.0%}"),
    "median_volume_ml": ("median lesion volume, mL", "{:.2f}"),
    "median_diameter_mm": ("median lesion diameter, mm", "{:.1f}"),
}


def time_cases(shape: tuple[int, int, int], cases: int) -> None:
    """Print the median and max seconds to generate one case."""
    seconds = []
    for seed in range(cases):
        started = time.perf_counter()
        generate_case(shape, seed=seed)
        seconds.append(time.perf_counter() - started)
    print(f"{cases} cases of {shape}: median {statistics.median(seconds):.2f} s, "
          f"max {max(seconds):.2f} s (target for 128^3: < 2 s)")  # fmt: skip


def lesion_table(figures: dict[str, float], before: dict[str, float] | None = None) -> str:
    """Figures of :func:`liverseg.phantoms.statistics.summarize` beside their targets.

    Args:
        figures: The measured figures.
        before: The same figures of another dataset, printed in a column before them.
    """
    head = f"{'before':>9} " if before else ""
    lines = [f"{'figure':44} {head}{'measured':>9}  target"]
    for key, (name, form) in _ROWS.items():
        target = ""
        if key in TARGETS:
            lo, hi = TARGETS[key]
            target = f"{form.format(lo)} to {form.format(hi)}"
        old = f"{form.format(before[key]):>9} " if before else ""
        lines.append(f"{name:44} {old}{form.format(figures[key]):>9}  {target}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesions", action="store_true", help="lesion figures, not speed")
    parser.add_argument("--shape", type=int, nargs=3, help="128 128 128; --lesions: 96 96 64")
    parser.add_argument("--cases", type=int, help="5; --lesions: 40")
    parser.add_argument("--seed", type=int, default=21, help="dataset seed of --lesions")
    parser.add_argument("--folder", help="--lesions: measure this Task03-layout dataset")
    parser.add_argument("--before", help="--lesions: also measure this dataset, for comparison")
    args = parser.parse_args()
    if not args.lesions:
        time_cases(tuple(args.shape or (128, 128, 128)), args.cases or 5)
        return
    if args.folder:
        found, case_ids = measure_folder(args.folder)
        print(f"lesions of {args.folder}")
    else:
        shape, cases = tuple(args.shape or (96, 96, 64)), args.cases or 40
        found, case_ids = [], []
        for index in range(cases):
            case = render_case(shape, case_seed(args.seed, index))
            found += measure_lesions(case.image, case.label, case.affine, str(index))
            case_ids.append(str(index))
        drawn = ", ".join(f"{kind} {share:.0%}" for kind, (share, _) in KINDS.items())
        print(f"lesions of --cases {cases} --shape {' '.join(map(str, shape))} "
              f"--seed {args.seed}; kinds drawn: {drawn}")  # fmt: skip
    before = summarize(*measure_folder(args.before)) if args.before else None
    if before:
        print(f"before: lesions of {args.before}")
    print(lesion_table(summarize(found, case_ids), before))


if __name__ == "__main__":
    main()
