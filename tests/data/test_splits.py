"""k-fold splits: drawn once per dataset, every case validated exactly once, refused when stale."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from liverseg.data.splits import (
    draw_folds,
    folds_path,
    load_or_create_fold_split,
    load_or_create_folds,
    read_folds,
)
from liverseg.errors import DataError

CASES = [f"liver_{i}" for i in range(11)]


@pytest.mark.parametrize("folds", [2, 3, 5, 11])
def test_every_case_is_validated_exactly_once_and_trained_on_in_the_other_folds(folds):
    splits = draw_folds(CASES, folds, seed=0)
    assert len(splits) == folds
    assert Counter(c for split in splits for c in split["val"]) == Counter(CASES)
    for split in splits:
        assert not set(split["train"]) & set(split["val"])
        assert sorted(split["train"] + split["val"]) == sorted(CASES)
    # KFold's sizes: 11 cases in 3 folds are 4, 4, 3
    sizes = [len(split["val"]) for split in splits]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_folds_are_determined_by_the_seed_not_the_order_of_the_cases():
    once = draw_folds(CASES, 5, seed=3)
    assert draw_folds(list(reversed(CASES)), 5, seed=3) == once
    assert draw_folds(CASES, 5, seed=4) != once


def test_more_folds_than_cases_is_refused():
    with pytest.raises(DataError, match=r"data.folds=12 but the dataset holds 11 cases.*2 and 11"):
        draw_folds(CASES, 12, seed=0)


def test_the_splits_file_is_written_once_and_read_back(tmp_path):
    path = folds_path(tmp_path, 5, 0)
    assert path == tmp_path / "splits_5fold_seed0.json"
    splits = load_or_create_folds(path, CASES, 5, 0)
    assert json.loads(path.read_text()) == splits
    assert read_folds(path) == splits
    # the file wins over a new draw: edit it (still valid) and it is what comes back
    edited = [dict(split) for split in reversed(splits)]
    path.write_text(json.dumps(edited))
    assert load_or_create_folds(path, CASES, 5, 0) == edited
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


@pytest.mark.parametrize(
    "cases, message",
    [
        (CASES + ["liver_99"], r"no longer matches the dataset's cases \(1 not in it: liver_99; 0"),
        (CASES[1:], r"no longer matches the dataset's cases \(0 not in it; 1 in it but gone: liv"),
    ],
)
def test_a_splits_file_that_does_not_match_the_cases_is_refused(tmp_path, cases, message):
    path = folds_path(tmp_path, 5, 0)
    load_or_create_folds(path, CASES, 5, 0)
    with pytest.raises(DataError, match=message) as error:
        load_or_create_folds(path, cases, 5, 0)
    assert str(path) in str(error.value) and "delete it" in str(error.value)


def test_a_splits_file_with_another_number_of_folds_is_refused(tmp_path):
    path = folds_path(tmp_path, 5, 0)
    path.write_text(json.dumps(draw_folds(CASES, 3, 0)))
    with pytest.raises(DataError, match=r"holds 3 folds but data.folds=5"):
        load_or_create_folds(path, CASES, 5, 0)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not readable JSON"),
        ('{"train": [], "val": []}', r'is not a list of \{"train"'),
        ('[{"train": ["a"], "val": ["b"]}]', "at least 2"),
        (
            '[{"train": ["b"], "val": ["a"]}, {"train": ["b"], "val": ["a"]}]',
            "validates a in more than one fold; validates b in no fold",
        ),
        (
            '[{"train": ["b", "a"], "val": ["a"]}, {"train": ["a"], "val": ["b"]}]',
            "fold 0 does not train on exactly the cases it does not validate",
        ),
    ],
)
def test_a_damaged_splits_file_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "splits_2fold_seed0.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        read_folds(path)
    assert str(path) in str(error.value)


def test_a_fold_is_saved_as_the_runs_split_and_a_changed_one_is_refused(tmp_path):
    run_split = tmp_path / "run" / "split.json"
    run_split.parent.mkdir()
    split = load_or_create_fold_split(run_split, tmp_path, CASES, 5, 2, 0)
    assert split == json.loads(folds_path(tmp_path, 5, 0).read_text())[2]
    assert json.loads(run_split.read_text()) == split
    assert load_or_create_fold_split(run_split, tmp_path, CASES, 5, 2, 0) == split  # resume
    with pytest.raises(DataError, match=r"split.json is not fold 3 of .*splits_5fold_seed0.json"):
        load_or_create_fold_split(run_split, tmp_path, CASES, 5, 3, 0)
