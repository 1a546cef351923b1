"""The record of a training run: ``metrics.csv`` (one row per epoch) and ``curves.png``.

``metrics.csv`` is rewritten whole and atomically every epoch; a resumed run reads back the rows up
to its checkpoint's epoch, so a row written after the last checkpoint is dropped and redone. Each
checkpoint carries the rows too: when the file is missing, emptied, garbled or disagrees with them,
the checkpoint's rows win and the file is rewritten from them (:func:`resume_history`).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

from liverseg.constants import DICE_CLASSES
from liverseg.io import atomic_path

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["epoch", "train_loss", "lr", *(f"dice_{c}" for c in DICE_CLASSES), "seconds"]


def metrics_row(epoch: int, loss: float, lr: float, scores: dict, started: float) -> dict:
    """One ``metrics.csv`` row: epoch, train loss, lr, validation Dice (if any), seconds.

    Every column is text, exactly as the file holds it (``""`` without validation), so a row kept
    in memory or in a checkpoint equals the row read back from the file.
    """
    row = dict.fromkeys(METRIC_COLUMNS, "")
    row.update(
        epoch=str(epoch),
        train_loss=f"{loss:.6f}",
        lr=str(lr),
        seconds=f"{time.perf_counter() - started:.1f}",
    )
    row.update({f"dice_{k}": f"{v:.4f}" for k, v in scores.items()})
    return row


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite metrics.csv atomically with ``rows``."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_metrics(path: Path, up_to_epoch: int) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of metrics.csv up to ``up_to_epoch``, and what is wrong with the file.

    Rows after ``up_to_epoch`` were written just before a kill that came before their checkpoint:
    they are left out without a word, and the resumed run redoes those epochs.

    Returns:
        ``(rows, problems)``: the readable rows, each with every column of
        :data:`METRIC_COLUMNS` as text; one phrase per problem ("is empty", "line 4: epoch 'x'
        is not a whole number", ...), to follow the file's name in a message.
    """
    if not path.is_file():
        return [], ["is missing"]
    rows, problems = [], []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return [], ["is empty"]
            if "epoch" not in reader.fieldnames:
                return [], [f"has no epoch column (header: {','.join(reader.fieldnames)[:80]})"]
            for row in reader:
                try:
                    epoch = int(row["epoch"])
                except (TypeError, ValueError):
                    problems.append(
                        f"line {reader.line_num}: epoch {row['epoch']!r} is not a whole number"
                    )
                    continue
                if epoch <= up_to_epoch:
                    rows.append({c: row.get(c) or "" for c in METRIC_COLUMNS})
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [], [f"cannot be read as CSV ({exc})"]
    return rows, problems


def resume_history(
    path: Path, epoch: int, saved: list[dict] | None, checkpoint: Path
) -> list[dict[str, str]]:
    """The metrics rows a run resumed after ``epoch`` goes on from; ``metrics.csv`` repaired.

    The checkpoint's rows are the truth: when the file is missing, empty, garbled or disagrees
    with them, a warning names the file and it is rewritten from them at once.

    Args:
        path: The run's ``metrics.csv``.
        epoch: The checkpoint's epoch.
        saved: The checkpoint's rows (:func:`liverseg.checkpoints.saved_history`); None for a
            checkpoint that holds none (written before they were stored): then the file's
            readable rows are kept, and a warning says what it lacks.
        checkpoint: The checkpoint's path, for the messages.

    Returns:
        The rows up to ``epoch``, every column as text.
    """
    rows, problems = read_metrics(path, epoch)
    if saved is None:
        if problems:
            log.warning(
                "%s %s; kept its %d readable rows up to epoch %d (%s holds no copy of them)",
                path, "; ".join(problems), len(rows), epoch, checkpoint,
            )  # fmt: skip
        return rows
    saved = [{c: str(row.get(c, "")) for c in METRIC_COLUMNS} for row in saved]
    if problems or rows != saved:
        reason = "; ".join(problems) or f"disagrees with {checkpoint} up to epoch {epoch}"
        log.warning(
            "%s %s: rewritten from the %d rows %s holds (up to epoch %d)",
            path, reason, len(saved), checkpoint, epoch,
        )  # fmt: skip
        write_metrics(path, saved)
    return saved


def plot_curves(rows: list[dict], path: Path) -> None:
    """Loss and validation Dice per epoch, to ``curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def number(text) -> float:
        try:
            return float(text)
        except (TypeError, ValueError):  # "" (not validated) or a damaged value: no point
            return math.nan

    def column(name):
        return [number(r.get(name)) for r in rows]

    epochs = column("epoch")
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, column("train_loss"), marker=".")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    for name in DICE_CLASSES:
        values = column(f"dice_{name}")
        points = [(e, v) for e, v in zip(epochs, values) if not math.isnan(v)]
        if points:
            ax_dice.plot(*zip(*points), marker="o", label=name)
    ax_dice.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice")
    if ax_dice.lines:
        ax_dice.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
