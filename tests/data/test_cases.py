"""Finding cases and the data doctor, on tiny NIfTI volumes written in tmp_path."""

import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import liverseg.data.checks
from liverseg.cli import main
from liverseg.constants import LIVER, TUMOR
from liverseg.data.cases import Case, MissingTestFolderError, find_cases
from liverseg.data.checks import check_case, check_dataset
from liverseg.data.downsampling import downsampled_affine
from liverseg.data.problems import format_problems, has_errors, raise_for_errors
from liverseg.errors import DataError
from liverseg.geometry import label_affine_matches

SHAPE = (24, 20, 16)
AFFINE = np.array(
    [[-0.8, 0, 0, 90.0], [0, -0.8, 0, 80.0], [0, 0, 2.5, -120.0], [0, 0, 0, 1]], dtype=float
)


def phantom(seed=0, tumor=True):
    """(int16 HU image, uint8 label) of SHAPE: air, a body, a liver with an optional tumor."""
    rng = np.random.default_rng(seed)
    image = np.full(SHAPE, -1000, np.int16)
    image[2:22, 2:18, :] = 40
    label = np.zeros(SHAPE, np.uint8)
    label[5:17, 4:14, 3:13] = LIVER
    if tumor:
        label[8:12, 6:10, 6:10] = TUMOR
    image[label == LIVER] = 110
    image[label == TUMOR] = 70
    image += rng.integers(-15, 15, SHAPE, dtype=np.int16)
    return image, label


def write_nifti(path, array, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_case(root, n, image=None, label=None, affine=AFFINE, label_affine=None):
    """Write imagesTr/liver_n + labelsTr/liver_n (a valid case unless told otherwise)."""
    default_image, default_label = phantom(n)
    image = default_image if image is None else image
    label = default_label if label is None else label
    label_affine = affine if label_affine is None else label_affine
    image_path = write_nifti(root / "imagesTr" / f"liver_{n}.nii.gz", image, affine)
    label_path = write_nifti(root / "labelsTr" / f"liver_{n}.nii.gz", label, label_affine)
    return Case(f"liver_{n}", image_path, label_path)


def write_dataset_json(root, training_ids, test_ids=()):
    content = {
        "name": "Liver",
        "training": [
            {"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
            for i in training_ids
        ],
        "test": [f"./imagesTs/liver_{i}.nii.gz" for i in test_ids],
    }
    (root / "dataset.json").write_text(json.dumps(content))


def patch_header(path, **fields):
    """Rewrite header fields of a .nii.gz as stored, bypassing nibabel's fixes on save."""
    raw = gzip.open(path).read()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    for key, value in fields.items():
        header[key] = value
    buffer = io.BytesIO()
    header.write_to(buffer)
    with gzip.open(path, "wb") as f:
        f.write(buffer.getvalue() + raw[len(buffer.getvalue()) :])


def only(problems, path):
    """The single problem of ``path`` (and nothing about other files)."""
    assert [p.path for p in problems] == [path], format_problems(problems)
    return problems[0]


# --------------------------------------------------------------------------- discovery


def test_dataset_json_lists_cases_sorted_numerically(tmp_path):
    for n in (10, 2, 1):
        write_case(tmp_path, n)
    write_nifti(tmp_path / "imagesTs" / "liver_132.nii.gz", phantom()[0])
    write_dataset_json(tmp_path, [10, 2, 1], [132])
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["liver_1", "liver_2", "liver_10"]
    assert cases[2].image == tmp_path / "imagesTr" / "liver_10.nii.gz"
    assert cases[2].label == tmp_path / "labelsTr" / "liver_10.nii.gz"
    (test,) = find_cases(tmp_path, split="test")
    assert test == Case("liver_132", tmp_path / "imagesTs" / "liver_132.nii.gz", None)


def test_dataset_json_is_authoritative_and_unlisted_files_are_warned(tmp_path):
    for n in (1, 2):
        write_case(tmp_path, n)
    write_dataset_json(tmp_path, [1])
    assert [c.case_id for c in find_cases(tmp_path)] == ["liver_1"]
    problems = check_dataset(tmp_path)
    assert not has_errors(problems)
    assert {p.path for p in problems} == {
        tmp_path / "imagesTr" / "liver_2.nii.gz",
        tmp_path / "labelsTr" / "liver_2.nii.gz",
    }
    assert all("not listed in dataset.json" in p.message for p in problems)


def test_pairing_by_name_without_dataset_json(tmp_path):
    for n in (10, 9, 2):
        write_case(tmp_path, n)
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["liver_2", "liver_9", "liver_10"]
    assert all(c.label == tmp_path / "labelsTr" / c.image.name for c in cases)
    assert find_cases(tmp_path, split="test") == []


def test_unpaired_files_are_missing_partners(tmp_path):
    case = write_case(tmp_path, 1)
    case.label.unlink()
    orphan = write_case(tmp_path, 2)
    orphan.image.unlink()
    problems = check_dataset(tmp_path)
    assert {(p.severity, p.path) for p in problems} == {
        ("error", case.label),
        ("error", orphan.image),
    }
    assert all("missing" in p.message for p in problems)


def test_dataset_json_entry_without_files(tmp_path):
    write_case(tmp_path, 1)
    write_dataset_json(tmp_path, [1, 5])
    problems = check_dataset(tmp_path)
    assert {p.path for p in problems} == {
        tmp_path / "imagesTr" / "liver_5.nii.gz",
        tmp_path / "labelsTr" / "liver_5.nii.gz",
    }
    assert has_errors(problems)


def test_hidden_apple_double_files_are_never_opened(tmp_path, monkeypatch):
    for n in (1, 2):
        write_case(tmp_path, n)
    before = find_cases(tmp_path)
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder / "._liver_1.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X junk")
        (tmp_path / folder / "._liver_7.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X junk")
    opened = []
    real_load = nib.load
    monkeypatch.setattr(
        liverseg.data.checks.nib, "load", lambda p, *a, **k: opened.append(p) or real_load(p)
    )
    assert find_cases(tmp_path) == before
    assert check_dataset(tmp_path) == []
    assert opened and not any(Path(p).name.startswith(".") for p in opened)


def test_missing_folders_say_where_they_looked(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_cases(tmp_path / "nowhere")
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "labelsTr")):
        find_cases(tmp_path)


def test_check_covers_test_images_and_needs_the_training_folders(tmp_path):
    write_case(tmp_path, 1)
    image = phantom()[0].astype(np.float32)
    image[0, 0, 0] = np.nan
    unlabeled = write_nifti(tmp_path / "imagesTs" / "liver_132.nii.gz", image)
    problems = check_dataset(tmp_path)
    assert "NaN" in only(problems, unlabeled).message and problems.n_cases == 2
    (tmp_path / "empty").mkdir()
    write_dataset_json(tmp_path / "empty", [1])
    with pytest.raises(DataError, match="looked for"):
        check_dataset(tmp_path / "empty")


def test_listed_test_cases_without_their_folder_are_one_problem(tmp_path, capsys):
    write_case(tmp_path, 1)
    write_dataset_json(tmp_path, [1], test_ids=[132, 133])
    with pytest.raises(MissingTestFolderError, match="lists 2 test case"):
        find_cases(tmp_path, "test")
    problems = check_dataset(tmp_path)
    problem = only(problems, tmp_path / "imagesTs")
    assert problem.severity == "error" and "not found" in problem.message
    assert problems.n_cases == 1  # the training case was still checked
    assert main(["check", str(tmp_path)]) == 1
    assert str(tmp_path / "imagesTs") in capsys.readouterr().out


def test_duplicate_ids_are_errors(tmp_path):
    case = write_case(tmp_path, 1)
    image, _ = phantom(1)
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "imagesTr" / "liver_1.nii"))
    problems = check_dataset(tmp_path)
    (error,) = [p for p in problems if p.severity == "error"]
    assert "'liver_1' appears 2 times" in error.message and str(case.image) in error.message


def test_malformed_dataset_json_is_reported_and_names_are_paired(tmp_path):
    write_case(tmp_path, 1)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json"):
        find_cases(tmp_path)
    problems = check_dataset(tmp_path)
    assert only(problems, tmp_path / "dataset.json").severity == "error"
    assert problems.n_cases == 1


# --------------------------------------------------------------------------- one problem each


def _empty(root):
    case = write_case(root, 1)
    case.image.write_bytes(b"")
    return case.image


def _truncated(root):
    rng = np.random.default_rng(0)
    noisy = rng.integers(-1000, 1000, SHAPE, dtype=np.int16)
    case = write_case(root, 1, image=noisy)
    data = case.image.read_bytes()
    case.image.write_bytes(data[: len(data) // 2])
    return case.image


def _not_nifti(root):
    case = write_case(root, 1)
    case.label.write_bytes(b"<html>404 Not Found</html>")
    return case.label


def _shape_mismatch(root):
    return write_case(root, 1, label=phantom()[1][:, :, :-2]).label


def _spacing_mismatch(root):
    return write_case(root, 1, label_affine=AFFINE @ np.diag([1.25, 1.25, 0.4, 1])).label


def _bad_spacing(value):
    def breaker(root):
        case = write_case(root, 1)
        patch_header(case.image, pixdim=[1, value, 0.8, 2.5, 1, 1, 1, 1])
        return case.image

    return breaker


def _infinite_affine(root):
    case = write_case(root, 1)
    patch_header(case.image, srow_x=[np.inf, 0, 0, 90.0])
    return case.image


def _two_d(root):
    return write_case(root, 1, image=phantom()[0][:, :, 0]).image


def _four_d(root):
    image = phantom()[0]
    return write_case(root, 1, image=np.stack([image, image], axis=-1)).image


def _trailing_singleton(root):
    return write_case(root, 1, image=phantom()[0][..., None]).image


def _nan_voxels(root):
    image = phantom()[0].astype(np.float32)
    image[3, 3, 3] = np.nan
    image[4, 4, 4] = np.inf
    return write_case(root, 1, image=image).image


def _label_value_five(root):
    label = phantom()[1]
    label[0, 0, 0] = 5
    return write_case(root, 1, label=label).label


def _fractional_label(root):
    label = phantom()[1].astype(np.float32)
    label[label == LIVER] = 0.5
    return write_case(root, 1, label=label).label


def _identity_affine(root):
    return write_case(root, 1, affine=np.eye(4)).image


def _normalised(root):
    image = phantom()[0].astype(np.float32)
    image = (image - image.min()) / (image.max() - image.min())
    return write_case(root, 1, image=image).image


def _offset_no_air(root):
    return write_case(root, 1, image=phantom()[0] + 1024).image


def _tumor_free(root):
    return write_case(root, 1, label=phantom(tumor=False)[1]).label


def _absurd_size(root):
    case = write_case(root, 1)
    patch_header(case.image, dim=[3, 4000, 4000, 4000, 1, 1, 1, 1])
    return case.image


def _int8_wrapped(root):
    image = phantom()[0]
    image[:2] = -1100  # air below -1024 wraps to -76: some values stay negative
    return write_case(root, 1, image=image.astype(np.int8)).image


def _all_zero(root):
    return write_case(root, 1, image=np.zeros(SHAPE, np.int16)).image


def _mr_like(root):
    image = np.random.default_rng(0).integers(100, 3000, SHAPE).astype(np.int16)
    image[0, 0, 0], image[1, 1, 1] = 0, 4000
    return write_case(root, 1, image=image).image


def _lying_header(root):
    case = write_case(root, 1)
    patch_header(case.image, dim=[3, 240, 200, 160, 1, 1, 1, 1])
    return case.image


def _truncated_nii(root):
    path = write_nifti(root / "imagesTr" / "liver_1.nii", phantom()[0])
    write_nifti(root / "labelsTr" / "liver_1.nii.gz", phantom()[1])
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _dangling_symlink(root):
    case = write_case(root, 1)
    case.image.unlink()
    case.image.symlink_to(root / "moved" / case.image.name)
    return case.image


def _looping_symlink(root):
    case = write_case(root, 1)
    case.label.unlink()
    case.label.symlink_to(case.label.name)
    return case.label


BROKEN = {
    "empty": (_empty, "error", "empty file"),
    "truncated": (_truncated, "error", "truncated"),
    "not nifti": (_not_nifti, "error", "not a readable NIfTI"),
    "shape": (_shape_mismatch, "error", "label shape (24, 20, 14) differs"),
    "spacing": (_spacing_mismatch, "error", "spacing [1.0, 1.0, 1.0] mm (image: [0.8, 0.8, 2.5]"),
    "zero spacing": (_bad_spacing(0.0), "error", "positive finite voxel sizes"),
    "nan spacing": (_bad_spacing(np.nan), "error", "positive finite voxel sizes"),
    "negative spacing": (_bad_spacing(-0.8), "error", "positive finite voxel sizes"),
    "infinite affine": (_infinite_affine, "error", "positive finite voxel sizes"),
    "2d": (_two_d, "error", "expected a 3D volume"),
    "4d": (_four_d, "error", "expected a 3D volume"),
    "trailing 1": (_trailing_singleton, "warning", "read as 3D"),
    "nan voxels": (_nan_voxels, "error", "2 NaN/Inf voxels"),
    "label 5": (_label_value_five, "error", "label values [5]"),
    "fractional": (_fractional_label, "error", "non-integral values [0.5]"),
    "identity": (_identity_affine, "warning", "identity-like affine (axis-aligned, 1 mm spacing"),
    "normalised": (_normalised, "warning", "intensities span [0, 1]"),
    "no air": (_offset_no_air, "warning", "expected CT in HU"),
    "tumor free": (_tumor_free, "warning", "no tumor voxel"),
    "absurd size": (_absurd_size, "error", "shape (4000, 4000, 4000)"),
    "int8": (_int8_wrapped, "error", "stored as 8-bit integers (int8, -128..127)"),
    "all zero": (_all_zero, "warning", "every voxel is 0: a blank volume"),
    "mr like": (_mr_like, "warning", "intensities span [0, 4000]: expected CT in HU"),
    "lying header": (_lying_header, "error", "240 x 200 x 160 int16 voxels, 15,360,000 bytes"),
    "truncated nii": (_truncated_nii, "error", "the file holds only 15,612 bytes"),
    "dangling symlink": (_dangling_symlink, "error", "broken symlink: it points to"),
    "looping symlink": (_looping_symlink, "error", "symlink loop"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_each_problem_names_its_file(tmp_path, name):
    breaker, severity, words = BROKEN[name]
    path = breaker(tmp_path)
    problems = check_dataset(tmp_path)
    problem = only(problems, path)
    assert problem.severity == severity
    assert words in problem.message
    assert has_errors(problems) == (severity == "error")


def test_offset_storage_with_scl_inter_is_hu(tmp_path):
    path = _offset_no_air(tmp_path)
    patch_header(path, scl_slope=1.0, scl_inter=-1024.0)
    assert check_dataset(tmp_path) == []


def test_flipped_identity_affine_is_warned(tmp_path):
    path = write_case(tmp_path, 1, affine=np.diag([-1.0, -1.0, 1.0, 1.0])).image
    assert "1 mm spacing" in only(check_dataset(tmp_path), path).message


@pytest.mark.parametrize("times", [1, 2])
def test_identity_halved_by_prepare_is_still_warned(tmp_path, times):
    affine = np.eye(4)
    for _ in range(times):
        affine = downsampled_affine(affine, 2)
    path = write_case(tmp_path, 1, affine=affine).image
    problem = only(check_dataset(tmp_path), path)
    assert problem.severity == "warning"
    assert f"identity-like affine (axis-aligned, {2**times} mm spacing" in problem.message


@pytest.mark.parametrize(
    "make, expected",
    [
        ("absurd size", "header claims shape"),
        ("lying header", "the file is truncated or its header is wrong: copy it again"),
    ],
)
def test_bad_header_is_refused_before_its_voxels_are_read(tmp_path, monkeypatch, make, expected):
    path = {"absurd size": _absurd_size, "lying header": _lying_header}[make](tmp_path)
    real_read = liverseg.data.checks._read_voxels

    def read_voxels(file, *args):
        assert file != path, f"voxels of the {make} file were read"
        return real_read(file, *args)

    monkeypatch.setattr(liverseg.data.checks, "_read_voxels", read_voxels)
    problem = only(check_case(find_cases(tmp_path)[0]), path)
    assert problem.severity == "error" and expected in problem.message


def test_all_problems_of_a_dataset_are_reported_together(tmp_path):
    empty = write_case(tmp_path, 0).image
    empty.write_bytes(b"")
    label = phantom(1)[1]
    label[0, 0, 0] = 7
    bad_values = write_case(tmp_path, 1, label=label).label
    tumor_free = write_case(tmp_path, 2, label=phantom(2, tumor=False)[1]).label
    write_case(tmp_path, 3)
    problems = check_dataset(tmp_path)
    assert [(p.severity, p.path) for p in problems] == [
        ("error", empty),
        ("error", bad_values),
        ("warning", tumor_free),
    ]
    assert problems.n_cases == 4
    assert format_problems(problems).splitlines()[-1] == "4 cases, 2 errors, 1 warnings"


# --------------------------------------------------------------------------- label geometry


def shifted(affine, origin_mm):
    moved = affine.copy()
    moved[:3, 3] += origin_mm
    return moved


def test_label_affine_float_noise_is_accepted(tmp_path):
    # Task03 liver_2: ~3e-4 mm origin difference, enough to fail torchio's 1e-6 check.
    write_case(tmp_path, 2, label_affine=shifted(AFFINE, 3e-4))
    assert check_dataset(tmp_path) == []
    assert label_affine_matches(AFFINE, shifted(AFFINE, 3e-4), 0.01)
    assert not label_affine_matches(AFFINE, shifted(AFFINE, 0.02), 0.01)
    assert not label_affine_matches(AFFINE, np.full((4, 4), np.nan), 0.01)


def test_gross_label_affine_difference_is_an_error_or_a_warning_when_copying(tmp_path):
    case = write_case(tmp_path, 1, label_affine=shifted(AFFINE, 35.0))
    error = only(check_dataset(tmp_path), case.label)
    assert error.severity == "error"
    assert "35 mm" in error.message and "--copy-label-geometry" in error.message
    warning = only(check_dataset(tmp_path, copy_label_geometry=True), case.label)
    assert warning.severity == "warning" and "image's geometry will be used" in warning.message
    assert check_dataset(tmp_path, affine_tolerance_mm=40.0) == []


# --------------------------------------------------------------------------- reporting


def test_format_problems_without_problems_is_one_clear_line(tmp_path):
    write_case(tmp_path, 1)
    assert (
        format_problems(check_dataset(tmp_path))
        == "no problems found (1 cases, 0 errors, 0 warnings)"
    )


def test_raise_for_errors_carries_the_table_and_passes_warnings(tmp_path, caplog):
    tumor_free = write_case(tmp_path, 1, label=phantom(tumor=False)[1]).label
    raise_for_errors(check_dataset(tmp_path), tmp_path)
    assert str(tumor_free) in caplog.text
    bad = write_case(tmp_path, 2, label_affine=shifted(AFFINE, 35.0)).label
    problems = check_dataset(tmp_path)
    with pytest.raises(DataError) as info:
        raise_for_errors(problems, tmp_path)
    assert format_problems(problems) in str(info.value) and str(bad) in str(info.value)


def test_cli_check_exit_codes(tmp_path, capsys):
    write_case(tmp_path, 1)
    assert main(["check", str(tmp_path)]) == 0
    assert "no problems found" in capsys.readouterr().out
    bad = write_case(tmp_path, 2, label_affine=shifted(AFFINE, 35.0)).label
    assert main(["check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert str(bad) in out and out.strip().endswith("2 cases, 1 errors, 0 warnings")
    assert main(["check", "--copy-label-geometry", str(tmp_path)]) == 0
    assert main(["check", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_real_ct_passes_the_check(real_ct, tmp_path):
    image, mask = real_ct
    for folder, source in (("imagesTr", image), ("labelsTr", mask)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "liver_0.nii.gz").symlink_to(source)
    write_dataset_json(tmp_path, [0])
    problems = check_dataset(tmp_path)
    assert not has_errors(problems), format_problems(problems)
    # The fixture's mask is liver only.
    assert [p.message.split(",")[0] for p in problems] == ["no tumor voxel (value 2)"]


# --------------------------------------------------------------------------- datasets that lie


def test_scaled_int8_storage_is_hu_and_accepted(tmp_path):
    image = (phantom()[0] // 16).astype(np.int8)
    path = write_case(tmp_path, 1, image=image).image
    assert "int8" in only(check_dataset(tmp_path), path).message
    patch_header(path, scl_slope=16.0, scl_inter=0.0)
    assert check_dataset(tmp_path) == []


def test_cases_whose_files_are_all_broken_links_do_not_vanish(tmp_path, capsys):
    write_case(tmp_path, 1)
    moved = tmp_path / "moved"
    links = {}
    for folder in ("imagesTr", "labelsTr"):
        links[folder, 2] = tmp_path / folder / "liver_2.nii.gz"
        links[folder, 2].symlink_to(moved / "liver_2.nii.gz")
        links[folder, 3] = tmp_path / folder / "liver_3.nii.gz"
        links[folder, 3].symlink_to("liver_3.nii.gz")
    problems = check_dataset(tmp_path)
    assert problems.n_cases == 3
    messages = {p.path: p.message for p in problems if p.severity == "error"}
    assert set(messages) == set(links.values()) and len(problems) == 4
    for (_, n), path in links.items():
        assert ("broken symlink" if n == 2 else "symlink loop") in messages[path]
    assert str(moved / "liver_2.nii.gz") in messages[links["imagesTr", 2]]
    assert main(["check", str(tmp_path)]) == 1
    assert str(links["labelsTr", 3]) in capsys.readouterr().out


def test_dataset_json_paths_outside_the_root_are_errors_and_not_read(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_case(root, 1)
    elsewhere = write_case(tmp_path / "outside", 2)
    content = {
        "training": [
            {"image": "./imagesTr/liver_1.nii.gz", "label": "./labelsTr/liver_1.nii.gz"},
            {"image": "../outside/imagesTr/liver_2.nii.gz", "label": str(elsewhere.label)},
        ]
    }
    (root / "dataset.json").write_text(json.dumps(content))
    opened = []
    real_load = nib.load
    monkeypatch.setattr(
        liverseg.data.checks.nib, "load", lambda p, *a, **k: opened.append(p) or real_load(p)
    )
    problems = check_dataset(root)
    outside = {root / "../outside/imagesTr/liver_2.nii.gz", elsewhere.label}
    assert {p.path for p in problems} == outside and has_errors(problems)
    assert all("outside the dataset folder" in p.message for p in problems)
    assert all("symlink to it inside the folder" in p.message for p in problems)
    assert not any("outside" in str(p) for p in opened)
    with pytest.raises(DataError, match="outside the dataset folder"):
        raise_for_errors(check_dataset(root, cases=find_cases(root)), root)
    # What the message offers: a link inside the folder is the user's explicit choice.
    for folder, target in (("imagesTr", elsewhere.image), ("labelsTr", elsewhere.label)):
        (root / folder / "liver_2.nii.gz").symlink_to(target)
    write_dataset_json(root, [1, 2])
    assert check_dataset(root) == []


def test_empty_dataset_is_an_error_of_check_and_of_training(tmp_path, capsys):
    root = tmp_path / "data"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    problem = only(check_dataset(root), root / "imagesTr")
    assert problem.severity == "error" and problem.message.startswith("no training case:")
    assert main(["check", str(root)]) == 1
    capsys.readouterr()
    code = main(["train", f"data.root={root}", f"run.dir={tmp_path / 'run'}", "data.num_workers=0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no training case" in err and str(root / "imagesTr") in err
    assert "num_train" not in err and "Traceback" not in err
    # A dataset.json with an empty training list: its files are unlisted, so still no case.
    write_case(root, 1)
    write_dataset_json(root, [])
    problems = check_dataset(root)
    error = only([p for p in problems if p.severity == "error"], root / "imagesTr")
    assert "dataset.json lists none under 'training'" in error.message
