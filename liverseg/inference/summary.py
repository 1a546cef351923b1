"""``summary.csv`` of ``liverseg predict``: its columns, its rows, and the part files of workers.

One row per case, sorted by case id (``liver_2`` before ``liver_10``); a second run adds to the
rows of the first. Several processes never write ``summary.csv`` together: each worker of
``--workers`` (or rank of torchrun) rewrites its own part file, ``summary.csv.part<k>``,
atomically after each case, and one process merges the parts into ``summary.csv`` and removes
them (:func:`merge_summary_parts`): at the end of the run, and at the start of the next one for
the parts a killed run left. A part's name ends neither in ``.csv`` nor in ``.nii.gz`` and has no
leading dot, so neither a lister of CSV or NIfTI files nor the stale temp cleanup
(:func:`liverseg.io.temp_destination`) takes it for something else.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

from liverseg.io import atomic_path, natural_key

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.csv"
PART_PATTERN = re.compile(re.escape(SUMMARY_NAME) + r"\.part(\d+)")
# ``worker``: ``<rank>/<device>`` of the process that predicted the row (``0/cpu`` for one
# process, ``1/cuda:1`` for worker or rank 1 on GPU 1); empty for a case skipped or never run.
# ``qc``: the report's quality control, ``ok`` or ``review: reason; reason``
# (:func:`liverseg.evaluation.qc.summary_text`).
# ``checkpoints``: the checkpoint files that made the row, joined by " | " (several: an
# ensemble). ``warnings``: the report's warnings joined by " | " (empty when there are none);
# last, so the columns before it keep their places and a long warning does not push them apart.
SUMMARY_COLUMNS = (
    "case_id",
    "liver_ml",
    "tumor_ml",
    "lesions",
    "seconds",
    "worker",
    "status",
    "qc",
    "input",
    "checkpoints",
    "warnings",
)
WARNING_SEPARATOR = " | "


def summary_row(case_id: str, path: Path, **values) -> dict:
    """A row of ``summary.csv``: ``values`` by column name, the others empty."""
    row = dict.fromkeys(SUMMARY_COLUMNS, "")
    row.update(case_id=case_id, input=str(path), **values)
    return row


def read_summary(path: Path) -> dict[str, dict]:
    """The rows of a summary (or part) file by case id; columns it lacks are empty."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {
            row["case_id"]: {c: row.get(c) or "" for c in SUMMARY_COLUMNS}
            for row in csv.DictReader(f)
            if row.get("case_id")
        }


def write_summary(path: Path, rows: dict[str, dict]) -> None:
    """Write ``rows`` (by case id) to ``path`` atomically, sorted by case id."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows[key] for key in sorted(rows, key=natural_key))


def part_path(out_dir: Path, index: int) -> Path:
    """The part file of worker (or rank) ``index``: ``summary.csv.part<index>``."""
    return Path(out_dir) / f"{SUMMARY_NAME}.part{index}"


def summary_parts(out_dir: Path) -> list[Path]:
    """The part files in ``out_dir``, by worker index."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    indexed = []
    for path in out_dir.iterdir():
        match = PART_PATTERN.fullmatch(path.name)
        if match and path.is_file():
            indexed.append((int(match[1]), path))
    return [path for _, path in sorted(indexed)]


def merge_summary_parts(out_dir: Path) -> dict[str, dict]:
    """Merge the part files of ``out_dir`` into its ``summary.csv``, remove them; return the rows.

    A part's row replaces the summary's row of the same case. ``summary.csv`` is written (once)
    before the parts are removed, so a crash in between leaves parts whose rows it already
    holds, and merging them again changes nothing. Without parts nothing is written.
    """
    summary_path = Path(out_dir) / SUMMARY_NAME
    rows = read_summary(summary_path)
    parts = summary_parts(out_dir)
    if not parts:
        return rows
    for part in parts:
        rows.update(read_summary(part))
    write_summary(summary_path, rows)
    for part in parts:
        part.unlink(missing_ok=True)
    log.info("merged %d summary part file(s) into %s", len(parts), summary_path)
    return rows
