"""data.downsampling and data.prepare: halving a Task03 folder, or resampling it to a spacing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_tiny_checkpoint

from liverseg.cli import main
from liverseg.config import load_config
from liverseg.constants import BACKGROUND, LABEL_VALUES, LIVER, TUMOR
from liverseg.data import prepare
from liverseg.data.cases import find_cases
from liverseg.data.checks import check_dataset
from liverseg.data.downsampling import (
    downsample_case,
    downsample_image,
    downsample_label,
    downsampled_affine,
)
from liverseg.data.prepare import (
    check_prepared_for_training,
    load_prepare_record,
    prepare_dataset,
)
from liverseg.data.respacing import resample_case
from liverseg.errors import DataError, LiversegError
from liverseg.geometry import spacing_mm
from liverseg.inference.batch import predict_paths
from liverseg.io import read_labels, read_volume
from liverseg.resampling import resample_image, resample_labels, stored_target
from liverseg.training.cache import preprocess_case
from liverseg.training.preflight import find_training_cases

RAS = np.array(
    [[0.8, 0, 0, -40.0], [0, 0.8, 0, 12.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]], dtype=float
)
# As many Task03 files store it: x and y flipped (LPS-like voxel axes).
LPS = np.array(
    [[-0.7, 0, 0, 90.0], [0, -0.7, 0, 60.0], [0, 0, 3.0, -500.0], [0, 0, 0, 1]], dtype=float
)


def _phantom(shape=(24, 20, 16), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """int16 CT (air, body, liver, darker tumor, noise) and its uint8 label."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    centre = np.array(shape) / 2
    body = (((grid - centre) / (np.array(shape) * 0.45)) ** 2).sum(-1) < 1
    liver = (((grid - centre * [0.8, 1, 1]) / (np.array(shape) * 0.25)) ** 2).sum(-1) < 1
    tumor = (((grid - centre * [0.8, 1, 1]) / 3.0) ** 2).sum(-1) < 1
    label = np.full(shape, BACKGROUND, dtype=np.uint8)
    label[liver] = LIVER
    label[tumor & liver] = TUMOR
    image = np.where(body, 40.0, -1000.0)
    image[label == LIVER] = 110
    image[label == TUMOR] = 60
    image += rng.normal(0, 10, shape)
    return image.astype(np.int16), label


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _centre_mm(affine: np.ndarray, shape) -> np.ndarray:
    return nib.affines.apply_affine(affine, (np.array(shape) - 1) / 2)


# --- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [RAS, LPS], ids=["RAS", "LPS"])
def test_shape_halves_spacing_doubles_centre_kept(tmp_path, affine):
    image, label = _phantom()
    src_image = _write(tmp_path / "ct.nii.gz", image, affine)
    src_label = _write(tmp_path / "seg.nii.gz", label, affine)
    record = downsample_case(src_image, src_label, tmp_path / "o.nii.gz", tmp_path / "s.nii", 2)

    out_image, out_label = nib.load(tmp_path / "o.nii.gz"), nib.load(tmp_path / "s.nii")
    assert out_image.shape == out_label.shape == (12, 10, 8)
    assert out_image.get_data_dtype() == np.int16 and out_label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out_image.affine[:3, :3], affine[:3, :3] * 2)
    np.testing.assert_allclose(out_label.affine, out_image.affine)
    assert nib.aff2axcodes(out_image.affine) == nib.aff2axcodes(affine)
    np.testing.assert_allclose(
        _centre_mm(out_image.affine, out_image.shape), _centre_mm(affine, image.shape)
    )
    # Block-centre convention: new voxel 0 sits at the mean of old voxels 0 and 1.
    np.testing.assert_allclose(out_image.affine[:3, 3], nib.affines.apply_affine(affine, [0.5] * 3))
    assert record["original_shape"] == [24, 20, 16] and record["new_shape"] == [12, 10, 8]
    np.testing.assert_allclose(record["original_affine"], affine)
    np.testing.assert_allclose(record["new_affine"], out_image.affine)
    assert record["source_image"]["path"] == str(src_image.resolve())


@pytest.mark.parametrize("affine", [RAS, LPS], ids=["RAS", "LPS"])
def test_bright_blob_stays_at_the_same_place_in_mm(affine):
    volume = np.zeros((30, 26, 20), dtype=np.int16)
    volume[17:21, 5:8, 11:14] = 1000
    reduced = downsample_image(volume, 2)

    def centroid_mm(array, aff):
        weights = array.astype(float)
        index = np.stack(np.nonzero(weights > 0), axis=1)
        mean_index = (index * weights[weights > 0][:, None]).sum(0) / weights.sum()
        return nib.affines.apply_affine(aff, mean_index)

    # Sampling moves the centroid by < 0.1 voxel; a half-voxel origin error moves it >= 0.35 mm.
    new_affine = downsampled_affine(affine, 2)
    np.testing.assert_allclose(
        centroid_mm(reduced, new_affine), centroid_mm(volume, affine), atol=0.2
    )


def test_odd_size_rounds_up_and_keeps_the_last_slice():
    volume = np.zeros((6, 6, 7), dtype=np.int16)
    volume[:, :, 6] = 800
    label = np.zeros((6, 6, 7), dtype=np.uint8)
    label[:, :, 6] = TUMOR
    assert downsample_image(volume, 2).shape == (3, 3, 4)
    assert downsample_image(volume, 2)[:, :, 3].min() > 400
    assert (downsample_label(label, 2)[:, :, 3] == TUMOR).all()


def test_linear_ramp_sampled_at_block_centres():
    # A linear ramp survives the symmetric Gaussian: the interior equals the ramp at i*2 + 0.5.
    ramp = np.broadcast_to(10 * np.arange(40, dtype=np.int16)[:, None, None], (40, 4, 4))
    reduced = downsample_image(np.ascontiguousarray(ramp), 2)
    np.testing.assert_array_equal(reduced[2:-2, 1, 1], 20 * np.arange(2, 18) + 5)
    assert downsample_image(np.full((8, 8, 8), -123, np.int16), 2).min() == -123
    assert downsample_image(np.full((8, 8, 8), -123, np.int16), 2).max() == -123


def test_scaled_float_storage_becomes_int16_hu():
    stored = np.full((8, 8, 8), 50, dtype=np.int16)
    reduced = downsample_image(stored, 2, slope=2.0, inter=-1024.0)
    assert reduced.dtype == np.int16
    assert (reduced == 50 * 2 - 1024).all()


# --- labels -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "tumor_blocks"),
    [((4, 4, 4), 1), ((5, 5, 5), 1), ((4, 5, 6), 2), ((4, 5, 5), 1)],
    ids=["aligned", "1_voxel_in_8_blocks", "4_voxels_in_2_blocks", "2_voxels_in_4_blocks"],
)
def test_a_2x2x2_tumor_survives_wherever_it_lies(offset, tumor_blocks):
    label = np.zeros((20, 20, 20), dtype=np.uint8)
    label[2:16, 2:16, 2:16] = LIVER
    x, y, z = offset
    label[x : x + 2, y : y + 2, z : z + 2] = TUMOR
    reduced = downsample_label(label, 2)
    assert reduced.dtype == np.uint8
    assert set(np.unique(reduced).tolist()) == set(LABEL_VALUES)
    tumor_index = np.argwhere(reduced == TUMOR)
    assert len(tumor_index) == tumor_blocks
    # Every TUMOR block holds some of the original tumor.
    for block in tumor_index:
        assert (label[tuple(slice(2 * i, 2 * i + 2) for i in block)] == TUMOR).any()


def test_label_rule_by_block_fractions():
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[0:2, 0:2, 0:2] = LIVER
    label[0, 0, 0:2] = TUMOR  # block (0,0,0): 2/8 tumor, 6/8 liver -> TUMOR
    label[2:4, 2:4, 2:4] = LIVER
    label[2, 2, 2] = TUMOR  # block (1,1,1): 1/8 tumor touching block (0,0,0) -> LIVER
    label[6, 6, 6] = TUMOR  # block (3,3,3): a lone 1-voxel tumor, rescued -> TUMOR
    label[6:8, 0:2, 0] = LIVER  # block (3,0,0): 4/8 liver, a tie -> LIVER
    label[6:8, 6:8, 0] = LIVER
    label[7, 7, 0] = BACKGROUND  # block (3,3,0): 3/8 liver -> BACKGROUND
    reduced = downsample_label(label, 2)
    assert reduced[0, 0, 0] == TUMOR
    assert reduced[1, 1, 1] == LIVER
    assert reduced[3, 3, 3] == TUMOR
    assert reduced[3, 0, 0] == LIVER
    assert reduced[3, 3, 0] == BACKGROUND
    assert reduced[2, 2, 2] == BACKGROUND


def test_large_tumor_volume_is_kept_within_a_tenth():
    _, label = _phantom(shape=(40, 40, 40))
    reduced = downsample_label(label, 2)
    for value in (LIVER, TUMOR):
        before = (label == value).sum()
        after = (reduced == value).sum() * 8
        assert abs(after - before) <= 0.1 * before, (value, before, after)


# The factor's and the spacing's case functions: (image, label, out_image, out_label) -> record.
CASE_FUNCTIONS = pytest.mark.parametrize(
    "prepare_case",
    [lambda *paths: downsample_case(*paths, 2), lambda *paths: resample_case(*paths, SPACING)],
    ids=["factor", "spacing"],
)


@CASE_FUNCTIONS
def test_label_values_outside_the_set_name_the_file(tmp_path, prepare_case):
    image, label = _phantom()
    label[3, 3, 3] = 7
    src_image = _write(tmp_path / "ct.nii.gz", image, RAS)
    src_label = _write(tmp_path / "bad_seg.nii.gz", label, RAS)
    with pytest.raises(DataError, match=r"bad_seg\.nii\.gz.*\[7\]"):
        prepare_case(src_image, src_label, tmp_path / "o.nii.gz", tmp_path / "s.nii.gz")
    assert not (tmp_path / "s.nii.gz").exists()


@CASE_FUNCTIONS
def test_label_shape_mismatch_names_both_files(tmp_path, prepare_case):
    image, label = _phantom()
    src_image = _write(tmp_path / "ct.nii.gz", image, RAS)
    src_label = _write(tmp_path / "seg.nii.gz", label[:, :, :-1], RAS)
    with pytest.raises(DataError, match=r"seg\.nii\.gz.*\(24, 20, 15\).*\(24, 20, 16\)"):
        prepare_case(src_image, src_label, tmp_path / "o.nii.gz", tmp_path / "s.nii.gz")


def test_label_affine_float_noise_takes_the_image_affine(tmp_path):
    image, label = _phantom()
    noisy = RAS.copy()
    noisy[0, 3] += 3e-4
    src_image = _write(tmp_path / "ct.nii.gz", image, RAS)
    src_label = _write(tmp_path / "seg.nii.gz", label, noisy)
    record = downsample_case(src_image, src_label, tmp_path / "o.nii.gz", tmp_path / "s.nii.gz", 2)
    np.testing.assert_array_equal(
        nib.load(tmp_path / "s.nii.gz").affine, nib.load(tmp_path / "o.nii.gz").affine
    )
    np.testing.assert_allclose(record["original_label_affine"], noisy)


@CASE_FUNCTIONS
def test_unreadable_image_names_the_file(tmp_path, prepare_case):
    bad = tmp_path / "liver_9.nii.gz"
    bad.write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    with pytest.raises(DataError, match=r"liver_9\.nii\.gz: cannot read it as a NIfTI"):
        prepare_case(bad, None, tmp_path / "o.nii.gz", None)
    assert not (tmp_path / "o.nii.gz").exists()


def test_real_ct_halves_with_liver_kept(real_ct, tmp_path):
    image_path, mask_path = real_ct
    record = downsample_case(image_path, mask_path, tmp_path / "i.nii.gz", tmp_path / "m.nii.gz", 2)
    original = nib.load(mask_path)
    assert record["new_shape"] == [-(-n // 2) for n in original.shape]
    liver_before = (np.asanyarray(original.dataobj) > 0).sum()
    liver_after = (np.asanyarray(nib.load(tmp_path / "m.nii.gz").dataobj) > 0).sum() * 8
    assert abs(liver_after - liver_before) <= 0.1 * liver_before


# --- whole folders ----------------------------------------------------------------------------


def _task03(root: Path, n_train: int = 3, n_test: int = 1) -> Path:
    """A tiny Task03 folder: labelled cases (alternating RAS/LPS), test cases, ._ junk."""
    training, test = [], []
    for i in range(n_train + n_test):
        image, label = _phantom(seed=i)
        affine = RAS if i % 2 == 0 else LPS
        name = f"liver_{i}.nii.gz"
        if i < n_train:
            _write(root / "imagesTr" / name, image, affine)
            _write(root / "labelsTr" / name, label, affine)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _write(root / "imagesTs" / name, image, affine)
            test.append(f"./imagesTs/{name}")
    (root / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    dataset = {
        "name": "Liver",
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": n_train,
        "numTest": n_test,
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def _count_calls(monkeypatch) -> list[str]:
    calls = []

    def counting(image_path, *args, **kwargs):
        calls.append(Path(image_path).name)
        return downsample_case(image_path, *args, **kwargs)

    monkeypatch.setattr(prepare, "downsample_case", counting)
    return calls


def test_cli_prepare_end_to_end(tmp_path, capsys):
    src, out = _task03(tmp_path / "Task03_Liver"), tmp_path / "half"
    assert main(["prepare", str(src), str(out), "--workers", "2"]) == 0
    assert "prepared 4 cases (3 training with labels, 1 test)" in capsys.readouterr().out

    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"]["2"] == "cancer" and dataset["numTraining"] == 3
    assert dataset["test"] == ["./imagesTs/liver_3.nii.gz"]
    record = load_prepare_record(out)
    assert record["factor"] == 2 and sorted(record["cases"]) == [f"liver_{i}" for i in range(4)]
    for case in find_cases(out, split="training") + find_cases(out, split="test"):
        entry = record["cases"][case.case_id]
        assert nib.load(case.image).shape == tuple(entry["new_shape"]) == (12, 10, 8)
        np.testing.assert_allclose(nib.load(case.image).affine, entry["new_affine"])
        if case.label is not None:
            assert set(np.unique(np.asanyarray(nib.load(case.label).dataobj))) <= {0, 1, 2}
    assert record["cases"]["liver_3"]["label"] is None
    assert not (out / "imagesTr" / "._liver_0.nii.gz").exists()


def test_identity_source_is_recorded_untrusted_and_stays_warned(tmp_path, capsys):
    src, out = _task03(tmp_path / "src", n_train=2, n_test=0), tmp_path / "out"
    image, label = _phantom(seed=9)
    _write(src / "imagesTr" / "liver_0.nii.gz", image, np.eye(4))
    _write(src / "labelsTr" / "liver_0.nii.gz", label, np.eye(4))
    assert main(["prepare", str(src), str(out), "--workers", "1"]) == 0
    assert "1 cases have an identity-like placeholder affine" in capsys.readouterr().out
    cases = load_prepare_record(out)["cases"]
    assert cases["liver_0"]["spacing_trusted"] is False
    assert cases["liver_1"]["spacing_trusted"] is True
    # The halved identity (2 mm, origin 0.5) is still recognised by the data doctor.
    halved = out / "imagesTr" / "liver_0.nii.gz"
    warned = [p.path for p in check_dataset(out) if "identity-like" in p.message]
    assert warned == [halved]


def test_listed_test_cases_without_imagests_mean_no_test_cases(tmp_path, caplog):
    src, out = _task03(tmp_path / "src", n_train=2, n_test=1), tmp_path / "out"
    for path in (src / "imagesTs").iterdir():
        path.unlink()
    (src / "imagesTs").rmdir()
    summary = prepare_dataset(src, out, workers=1)
    assert "prepared 2 cases (2 training with labels, 0 test)" in summary
    assert any("imagesTs" in r.message and r.levelname == "WARNING" for r in caplog.records)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["test"] == [] and dataset["numTest"] == 0


def test_resume_after_interruption_skips_finished_cases(tmp_path, monkeypatch):
    src, out = _task03(tmp_path / "src"), tmp_path / "out"
    real = prepare.downsample_case

    class Killed(BaseException):
        """Stands in for Ctrl-C or a kill: not an error the run may collect."""

    def interrupted(image_path, *args, **kwargs):
        if Path(image_path).name == "liver_1.nii.gz":
            raise Killed
        return real(image_path, *args, **kwargs)

    monkeypatch.setattr(prepare, "downsample_case", interrupted)
    with pytest.raises(Killed):
        prepare_dataset(src, out, workers=1)
    assert sorted(load_prepare_record(out)["cases"]) == ["liver_0"]
    finished_mtime = (out / "imagesTr" / "liver_0.nii.gz").stat().st_mtime_ns

    calls = _count_calls(monkeypatch)
    summary = prepare_dataset(src, out, workers=1)
    assert calls == ["liver_1.nii.gz", "liver_2.nii.gz", "liver_3.nii.gz"]
    assert "3 written now, 1 already finished and skipped" in summary
    assert (out / "imagesTr" / "liver_0.nii.gz").stat().st_mtime_ns == finished_mtime

    calls.clear()
    prepare_dataset(src, out, workers=1)
    assert calls == []


def test_half_written_case_is_redone(tmp_path, monkeypatch):
    src, out = _task03(tmp_path / "src", n_train=2, n_test=0), tmp_path / "out"
    prepare_dataset(src, out, workers=1)
    # A run killed while writing liver_1's label: its temp file is left, the label is absent.
    (out / "labelsTr" / "liver_1.nii.gz").rename(out / "labelsTr" / ".liver_1.nii.gz.x.tmp.nii.gz")
    # A source fixed in place after it was prepared is prepared again.
    image, label = _phantom(seed=5)
    _write(src / "labelsTr" / "liver_0.nii.gz", label, RAS)

    calls = _count_calls(monkeypatch)
    prepare_dataset(src, out, workers=1)
    assert sorted(calls) == ["liver_0.nii.gz", "liver_1.nii.gz"]
    assert (out / "labelsTr" / "liver_1.nii.gz").is_file()
    assert not list((out / "labelsTr").glob(".*tmp*"))


def test_unreadable_case_is_named_and_the_others_are_written(tmp_path, capsys):
    src, out = _task03(tmp_path / "src"), tmp_path / "out"
    (src / "imagesTr" / "liver_1.nii.gz").write_bytes(b"not a nifti at all")
    (src / "labelsTr" / "liver_2.nii.gz").unlink()

    assert main(["prepare", str(src), str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "2 of 4 cases failed" in err
    assert f"{src / 'imagesTr' / 'liver_1.nii.gz'}: cannot read it as a NIfTI" in err
    assert f"{src / 'labelsTr' / 'liver_2.nii.gz'}: not found" in err
    assert sorted(load_prepare_record(out)["cases"]) == ["liver_0", "liver_3"]
    assert (out / "imagesTr" / "liver_0.nii.gz").is_file()
    assert (out / "imagesTs" / "liver_3.nii.gz").is_file()
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1


def test_resume_with_another_factor_is_refused(tmp_path):
    src, out = _task03(tmp_path / "src", n_train=1, n_test=0), tmp_path / "out"
    prepare_dataset(src, out, workers=1)
    with pytest.raises(DataError, match="prepared with factor 2, this run asks for factor 3"):
        prepare_dataset(src, out, factor=3, workers=1)
    with pytest.raises(DataError, match="OUT_DIR is SRC_DIR"):
        prepare_dataset(src, src, workers=1)


def test_missing_prepare_record_is_explained(tmp_path):
    with pytest.raises(DataError, match="prepare.json: not found"):
        load_prepare_record(tmp_path)


# --- at a target spacing (`--spacing`) ----------------------------------------------------------

# mm, RAS order. The LPS cases (0.7 x 0.7 x 3 mm, 24 x 20 x 16) land on it exactly (12 x 10 x 12
# voxels); the RAS ones (0.8 x 0.8 x 2.5 mm) only up to rounding: 14 x 11 x 10 voxels of
# 1.37 x 1.45 x 4 mm, more than 1% off in-plane.
SPACING = (1.4, 1.4, 4.0)
SPACED_SHAPES = {"RAS": (14, 11, 10), "LPS": (12, 10, 12)}
CACHE_SETTINGS = {
    "hu_min": -150.0,
    "hu_max": 250.0,
    "shape": [8, 8, 8],
    "min_size": 8,
    "affine_tolerance_mm": 0.01,
    "copy_label_geometry": False,
}


def _count_resamplings(monkeypatch) -> list[str]:
    calls = []

    def counting(image_path, *args, **kwargs):
        calls.append(Path(image_path).name)
        return resample_case(image_path, *args, **kwargs)

    monkeypatch.setattr(prepare, "resample_case", counting)
    return calls


def test_cli_prepare_at_a_spacing_resamples_as_the_cache_does(tmp_path, capsys):
    src, out = _task03(tmp_path / "src"), tmp_path / "spaced"
    argv = ["prepare", str(src), str(out), "--spacing", "1.4", "1.4", "4", "--workers", "1"]
    assert main(argv) == 0
    assert "resampled to 1.4 x 1.4 x 4 mm (x, y, z in RAS order)" in capsys.readouterr().out
    record = load_prepare_record(out)
    assert record["factor"] == 1 and record["spacing_mm"] == list(SPACING)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 3
    for case in find_cases(out, split="training") + find_cases(out, split="test"):
        entry = record["cases"][case.case_id]
        stored_as = "RAS" if int(case.case_id.split("_")[1]) % 2 == 0 else "LPS"
        source_affine = RAS if stored_as == "RAS" else LPS
        image = nib.load(case.image)
        assert image.shape == tuple(entry["new_shape"]) == SPACED_SHAPES[stored_as]
        assert image.get_data_dtype() == np.int16
        assert nib.aff2axcodes(image.affine) == nib.aff2axcodes(source_affine)
        # The field of view is kept: the volume's centre stays where it was, in mm.
        np.testing.assert_allclose(
            _centre_mm(image.affine, image.shape), _centre_mm(source_affine, (24, 20, 16)),
            atol=1e-3,
        )  # fmt: skip
        # The same resampling as the training cache and inference, in the stored axis order.
        hu, affine = read_volume(entry["source_image"]["path"])
        target = stored_target(affine, SPACING)
        expected, expected_affine = resample_image(hu, affine, target)
        np.testing.assert_array_equal(image.get_fdata(), np.rint(expected))
        np.testing.assert_allclose(image.affine, expected_affine, atol=1e-4)
        if case.label is None:
            assert entry["label"] is None
            continue
        labels, _ = read_labels(entry["source_label"]["path"])
        expected_labels, _ = resample_labels(labels, affine, target)
        label = nib.load(case.label)
        assert label.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asanyarray(label.dataobj), expected_labels)
        np.testing.assert_array_equal(label.affine, image.affine)
        assert (expected_labels == TUMOR).any()


def test_a_case_stored_slices_first_gets_each_axis_its_ras_target(tmp_path):
    # Stored axes (z, x, y): stored axis 0 is the 2.5 mm slice axis, whose target is RAS z's.
    affine = np.array([[0, 0.8, 0, -40.0], [0, 0, 0.8, 12.0], [2.5, 0, 0, -300.0], [0, 0, 0, 1]])
    image, label = _phantom(shape=(16, 24, 20))
    src_image = _write(tmp_path / "ct.nii.gz", image, affine)
    src_label = _write(tmp_path / "seg.nii.gz", label, affine)
    record = resample_case(
        src_image, src_label, tmp_path / "o.nii.gz", tmp_path / "s.nii.gz", SPACING
    )
    out = nib.load(tmp_path / "o.nii.gz")
    assert out.shape == nib.load(tmp_path / "s.nii.gz").shape == (10, 14, 11)
    assert record["new_shape"] == [10, 14, 11] and record["spacing_mm"] == list(SPACING)
    np.testing.assert_allclose(nib.affines.voxel_sizes(out.affine), [4.0, 19.2 / 14, 16 / 11])
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(affine)


def test_training_cache_at_the_prepared_spacing_resamples_nothing(tmp_path):
    src, out = _task03(tmp_path / "src", n_train=2, n_test=0), tmp_path / "spaced"
    prepare_dataset(src, out, spacing_mm=SPACING, workers=1)
    for case in find_cases(out, split="training"):  # liver_0: RAS, liver_1: LPS
        at_spacing = preprocess_case(
            case, tmp_path / "cache_a", {**CACHE_SETTINGS, "spacing_mm": list(SPACING)}
        )
        as_stored = preprocess_case(case, tmp_path / "cache_b", CACHE_SETTINGS)
        np.testing.assert_array_equal(np.load(at_spacing.image), np.load(as_stored.image))
        np.testing.assert_array_equal(np.load(at_spacing.label), np.load(as_stored.label))
        assert at_spacing.spacing_mm == as_stored.spacing_mm


def test_a_rounding_tie_is_not_resampled_again_in_the_cache(tmp_path):
    image, label = _phantom(shape=(24, 20, 25))
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    _write(tmp_path / "src" / "imagesTr" / "liver_0.nii.gz", image, affine)
    _write(tmp_path / "src" / "labelsTr" / "liver_0.nii.gz", label, affine)
    out = tmp_path / "spaced"
    prepare_dataset(tmp_path / "src", out, spacing_mm=(0.8, 0.8, 5.0), workers=1)
    (case,) = find_cases(out, split="training")
    prepared = nib.load(case.image)
    assert prepared.shape == (24, 20, 12)  # 25 * 2.5 / 5 = 12.5 slices, rounded to even
    cached = preprocess_case(
        case, tmp_path / "cache", {**CACHE_SETTINGS, "spacing_mm": [0.8, 0.8, 5.0]}
    )
    assert cached.spacing_mm == pytest.approx(spacing_mm(prepared.affine))


def test_resume_at_a_spacing_skips_finished_cases_and_refuses_another_method(tmp_path, monkeypatch):
    src, out = _task03(tmp_path / "src", n_train=2, n_test=0), tmp_path / "spaced"
    prepare_dataset(src, out, spacing_mm=SPACING, workers=1)
    (out / "imagesTr" / "liver_1.nii.gz").unlink()  # as if killed before writing it
    calls = _count_resamplings(monkeypatch)
    summary = prepare_dataset(src, out, spacing_mm=[1.4, 1.4, 4], workers=1)
    assert calls == ["liver_1.nii.gz"] and "1 written now, 1 already finished" in summary
    fresh = r"prepare\.json: .*Use the same --factor or --spacing to resume, or a fresh OUT_DIR"
    with pytest.raises(DataError, match=fresh):
        prepare_dataset(src, out, spacing_mm=(1.5, 1.5, 4.0), workers=1)
    with pytest.raises(DataError, match="prepared with spacing 1.4 x 1.4 x 4 mm, this run asks "):
        prepare_dataset(src, out, spacing_mm=(1.5, 1.5, 4.0), workers=1)
    with pytest.raises(
        DataError, match="with spacing 1.4 x 1.4 x 4 mm, this run asks for factor 2"
    ):
        prepare_dataset(src, out, workers=1)
    prepare_dataset(src, tmp_path / "half", workers=1)
    with pytest.raises(
        DataError, match="with factor 2, this run asks for spacing 1.4 x 1.4 x 4 mm"
    ):
        prepare_dataset(src, tmp_path / "half", spacing_mm=SPACING, workers=1)
    assert calls == ["liver_1.nii.gz"]


@pytest.mark.parametrize(
    ("spacing", "problem"),
    [((1.4, 0.0, 4.0), "> 0 mm"), ((1.4, float("nan"), 4.0), "> 0 mm"), ((1.4, 4.0), "three")],
    ids=["zero", "nan", "two_numbers"],
)
def test_a_bad_spacing_is_refused_before_any_work(tmp_path, spacing, problem):
    src, out = _task03(tmp_path / "src", n_train=1, n_test=0), tmp_path / "spaced"
    with pytest.raises(LiversegError, match=f"--spacing: .*{re.escape(problem)}"):
        prepare_dataset(src, out, spacing_mm=spacing, workers=1)
    with pytest.raises(LiversegError, match="--factor 2 and --spacing .* exclude each other"):
        prepare_dataset(src, out, factor=2, spacing_mm=SPACING, workers=1)
    assert not out.exists()


def test_cli_factor_and_spacing_exclude_each_other(tmp_path, capsys):
    src, out = _task03(tmp_path / "src", n_train=1, n_test=0), tmp_path / "spaced"
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(src), str(out), "--factor", "2", "--spacing", "1", "1", "2"])
    assert exit_info.value.code == 2
    assert "argument --spacing: not allowed with argument --factor" in capsys.readouterr().err
    assert main(["prepare", str(src), str(out), "--spacing", "1.4", "-1", "4"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert "--spacing: each must be a finite number > 0 mm" in line
    assert not out.exists()


def test_a_record_without_spacing_loads_and_a_broken_one_is_named(tmp_path):
    src, out = _task03(tmp_path / "src", n_train=1, n_test=0), tmp_path / "half"
    prepare_dataset(src, out, workers=1)
    record = json.loads((out / "prepare.json").read_text())
    assert record["spacing_mm"] is None
    del record["spacing_mm"]  # as written before --spacing existed
    (out / "prepare.json").write_text(json.dumps(record))
    assert load_prepare_record(out)["spacing_mm"] is None
    assert "0 written now, 1 already finished" in prepare_dataset(src, out, workers=1)
    check_prepared_for_training(out, 2, None)  # a factor folder: not this check's business
    record["spacing_mm"] = [1.4, 0, "x"]
    (out / "prepare.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"half/prepare\.json: 'spacing_mm' is .*> 0 mm"):
        load_prepare_record(out)


def test_training_on_a_spaced_root_needs_data_spacing_mm_to_match(tmp_path, caplog):
    src, out = _task03(tmp_path / "src", n_train=2, n_test=0), tmp_path / "spaced"
    prepare_dataset(src, out, spacing_mm=SPACING, workers=1)

    def training_cases(*overrides):
        return find_training_cases(load_config(None, (f"data.root={out}", *overrides)))

    for overrides in ((), ("data.factor=1",), ("data.factor=3",)):
        with pytest.raises(DataError) as refused:
            training_cases(*overrides)
        message = str(refused.value)
        assert (
            message.startswith(f"{out / 'prepare.json'}: ") and "data.spacing_mm is null" in message
        )
    # The fix the message gives works, and the cache then has nothing to resample.
    fix = re.search(r"data\.spacing_mm=\S+ data\.factor=1", message).group().split()
    with caplog.at_level("INFO", logger="liverseg.data.prepare"):
        assert [c.case_id for c in training_cases(*fix)] == ["liver_0", "liver_1"]
    assert any("already at data.spacing_mm" in r.getMessage() for r in caplog.records)
    caplog.clear()
    training_cases("data.spacing_mm=[2,2,5]", "data.factor=1")  # coarser: resampled again
    assert any(
        r.levelname == "WARNING" and "resamples it again" in r.getMessage() for r in caplog.records
    )
    with pytest.raises(DataError, match=r"coarser on some axis than data\.spacing_mm=1\.4 x 1"):
        training_cases("data.spacing_mm=[1.4,1.4,2]", "data.factor=1")


def _spacing_checkpoint(path: Path, spacing) -> Path:
    """An untrained tiny checkpoint of a model trained at ``spacing`` (data.factor 1)."""
    write_tiny_checkpoint(path, factor=1)
    state = torch.load(path, weights_only=True)
    state["config"]["data"]["spacing_mm"] = list(spacing)
    state["preprocessing"]["spacing_mm"] = list(spacing)
    torch.save(state, path)
    return path


def test_a_spacing_model_predicts_prepared_files_on_their_own_grid(tmp_path, monkeypatch):
    import liverseg.inference.volume

    src, out = _task03(tmp_path / "src", n_train=1, n_test=1), tmp_path / "spaced"
    prepare_dataset(src, out, spacing_mm=SPACING, workers=1)
    checkpoint = _spacing_checkpoint(tmp_path / "best.pt", SPACING)
    grids = []
    real = liverseg.inference.volume.resample_image

    def spy(volume, affine, target):
        resampled, new_affine = real(volume, affine, target)
        grids.append((volume.shape, resampled.shape))
        return resampled, new_affine

    monkeypatch.setattr(liverseg.inference.volume, "resample_image", spy)
    inputs = [out / "imagesTr" / "liver_0.nii.gz", out / "imagesTs" / "liver_1.nii.gz"]
    assert predict_paths(checkpoint, inputs, tmp_path / "preds", device="cpu") == []
    # Resampled to the model's spacing, as every input is: the grid stays the prepared one.
    assert grids == [(SPACED_SHAPES["RAS"],) * 2, (SPACED_SHAPES["LPS"],) * 2]
    for path in inputs:
        seg = nib.load(tmp_path / "preds" / path.name.replace(".nii.gz", "_seg.nii.gz"))
        assert seg.shape == nib.load(path).shape
        np.testing.assert_allclose(seg.affine, nib.load(path).affine, atol=1e-5)
