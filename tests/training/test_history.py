"""metrics.csv read back on resume: each problem named, the checkpoint's rows the truth."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from liverseg.training.history import (
    METRIC_COLUMNS,
    metrics_row,
    read_metrics,
    resume_history,
    write_metrics,
)

LAST = Path("run/checkpoints/last.pt")


def rows_up_to(epochs: int) -> list[dict]:
    return [metrics_row(e, 0.5 / e, 1e-4, {"tumor": 0.25}, 0.0) for e in range(1, epochs + 1)]


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "is missing"),
        (b"", "is empty"),
        (b"loss,lr\n0.5,0.1\n", "has no epoch column"),
        (b"epoch,train_loss\n1,0.5\n\x00\x00\n", "line 3: epoch '\\x00\\x00'"),
        (b"epoch,train_loss\n1,0.5\n\xff\xfe,x\n", "cannot be read as CSV"),
        (b"epoch,train_loss\n1,0.5\n2.5,0.4\n", "line 3: epoch '2.5' is not a whole number"),
    ],
    ids=["missing", "empty", "no-epoch", "nul", "not-utf8", "bad-epoch"],
)
def test_read_metrics_names_each_problem(tmp_path, content, problem):
    path = tmp_path / "metrics.csv"
    if content is not None:
        path.write_bytes(content)
    _, problems = read_metrics(path, up_to_epoch=5)
    assert len(problems) == 1 and problem in problems[0]


def test_rows_after_the_checkpoint_are_dropped_without_a_warning(tmp_path, caplog):
    path, written = tmp_path / "metrics.csv", rows_up_to(3)
    write_metrics(path, written)  # epoch 3 was killed before its checkpoint
    with caplog.at_level(logging.WARNING):
        rows = resume_history(path, 2, written[:2], LAST)
    assert rows == written[:2] and list(rows[0]) == METRIC_COLUMNS
    assert not caplog.records


def test_checkpoint_without_history_keeps_the_readable_rows_and_says_so(tmp_path, caplog):
    path = tmp_path / "metrics.csv"
    write_metrics(path, rows_up_to(2))
    path.write_text(path.read_text() + "garbage\n")
    with caplog.at_level(logging.WARNING):
        rows = resume_history(path, 2, None, LAST)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    (record,) = caplog.records
    assert "epoch 'garbage'" in record.message and "holds no copy" in record.message


def test_missing_metrics_csv_is_written_again_from_the_checkpoint(tmp_path, caplog):
    path, saved = tmp_path / "metrics.csv", rows_up_to(2)
    with caplog.at_level(logging.WARNING):
        rows = resume_history(path, 2, saved, LAST)
    assert rows == saved
    assert read_metrics(path, 2) == (rows, [])
    assert "is missing: rewritten from the 2 rows" in caplog.records[0].message
