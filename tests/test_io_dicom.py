"""DICOM CT series in: which series is read, its geometry against the NIfTI path, refusals."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from dicom_series import edit_slices, write_ct_series, write_other_objects  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
)

from liverseg.errors import DataError  # noqa: E402
from liverseg.io import list_dicom, read_volume, save_nifti  # noqa: E402
from liverseg.io.dicom import read_dicom_series  # noqa: E402
from liverseg.phantoms import generate_case  # noqa: E402

SHAPE = (24, 20, 12)


@pytest.fixture(scope="module", params=[False, True], ids=["ras", "lps"])
def phantom(request):
    """A phantom CT (int16 HU, RAS affine), stored RAS or LPS."""
    image, _, affine = generate_case(SHAPE, seed=3, lps=request.param)
    return image, affine


def write_pacs_folder(folder, image, affine):
    """The phantom as a CT series, beside a scout, a shorter series, a dose report and more."""
    uid = write_ct_series(folder, image, affine, seed=1)
    scout_affine = np.array([[0, 0, 2.0, 0], [1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    scout = np.full((SHAPE[0], SHAPE[1], 1), 40, np.int16)
    write_ct_series(folder, scout, scout_affine, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    short = write_ct_series(folder, image[:, :, :5], affine, description="short", seed=2)
    write_other_objects(folder)
    return uid, short


def test_series_reads_as_its_nifti_conversion(tmp_path, phantom, caplog):
    image, affine = phantom
    uid, short = write_pacs_folder(tmp_path / "pacs", image, affine)
    nifti = save_nifti(image, affine, tmp_path / "ct.nii.gz")
    expected, expected_affine = read_volume(nifti)
    with caplog.at_level(logging.INFO, logger="liverseg.io.dicom"):
        data, got_affine = read_volume(tmp_path / "pacs")
    assert data.dtype == np.int16 and data.shape == SHAPE
    np.testing.assert_array_equal(data, expected)
    np.testing.assert_allclose(got_affine, expected_affine, atol=1e-4)
    log = caplog.text
    assert uid in log and "most slices" in log and short in log and "localizer" in log
    assert "X-Ray Radiation Dose SR" in log and "Secondary Capture" in log
    data, got_affine = read_volume(tmp_path / "pacs", series_uid=short)
    np.testing.assert_array_equal(data, expected[:, :, :5])
    np.testing.assert_allclose(got_affine, expected_affine, atol=1e-4)


def test_left_handed_volume_keeps_every_voxel_in_place(tmp_path):
    """A NIfTI whose slices run against the normal: the series comes back flipped, same world."""
    image, _, affine = generate_case(SHAPE, seed=3, lps=False)
    flipped = image[:, :, ::-1]
    flipped_affine = affine @ np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, SHAPE[2] - 1], [0, 0, 0, 1.0]]
    )
    lps = np.diag([-1.0, -1, 1, 1]) @ flipped_affine
    # The writer puts slice k at origin + k * third column: give it the flipped order's geometry.
    write_ct_series(tmp_path / "s", flipped, flipped_affine)
    assert np.cross(lps[:3, 0], lps[:3, 1]) @ lps[:3, 2] < 0
    data, got_affine = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(data, image)
    np.testing.assert_allclose(got_affine, affine, atol=1e-4)


def test_real_ct_reads_back_voxel_for_voxel(real_ct, tmp_path):
    image, affine = read_volume(real_ct[0])
    write_ct_series(tmp_path / "real", image, affine)
    data, got_affine = read_volume(tmp_path / "real")
    assert data.dtype == image.dtype
    np.testing.assert_array_equal(data, image)
    np.testing.assert_allclose(got_affine, affine, atol=1e-4)


def test_fractional_rescale_gives_float32(tmp_path, phantom):
    image, affine = phantom
    write_ct_series(tmp_path / "s", image, affine, slope=0.5, intercept=-1000.5)
    data, _ = read_dicom_series(tmp_path / "s")
    assert data.dtype == np.float32
    np.testing.assert_allclose(data, image, atol=0.5)


def test_hu_beyond_int16_become_float32(tmp_path, phantom):
    image, affine = phantom
    write_ct_series(tmp_path / "s", image, affine, slope=2.0, intercept=-1024.0)
    edit_slices(tmp_path / "s", _uid(tmp_path / "s"), _set_pixel(20000), which=3)
    data, _ = read_dicom_series(tmp_path / "s")
    assert data.dtype == np.float32 and data.max() == 20000 * 2 - 1024


def _uid(folder):
    return str(pydicom.dcmread(list_dicom(folder)[0]).SeriesInstanceUID)


def _set_pixel(value):
    def edit(ds):
        pixels = ds.pixel_array.copy()
        pixels[0, 0] = value
        ds.PixelData = pixels.astype("<i2").tobytes()

    return edit


# --------------------------------------------------------------------------------- refusals


def _crop(ds):
    pixels = ds.pixel_array[:-1]
    ds.Rows -= 1
    ds.PixelData = pixels.astype("<i2").tobytes()


def _rotate(ds):
    ds.ImageOrientationPatient = [0, 1, 0, -1, 0, 0]


def _undecodable_syntax():
    """A compressed transfer syntax no installed plugin decodes (which depends on the extras:
    highdicom brings a JPEG-LS decoder); None when every candidate is decodable here."""
    from pydicom.pixels import get_decoder

    candidates = (JPEGLosslessSV1, HTJ2KLossless, JPEGLSLossless)
    return next((uid for uid in candidates if not get_decoder(uid).is_available), None)


def _compress(ds):
    syntax = _undecodable_syntax()
    if syntax is None:
        pytest.skip("every candidate compressed syntax has a decoder installed here")
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8 not really compressed pixels \xff\xd9"])


def _damage_jpeg2000(ds):
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless  # Pillow may decode it: it fails
    ds.PixelData = encapsulate([b"\xff\x4f not really JPEG 2000"])


def _drop_pixels(ds):
    del ds.PixelData


@pytest.mark.parametrize(
    "edit, which, message",
    [
        (_crop, 4, "mixed row/column sizes (19 x 24, 20 x 24)"),
        (_rotate, 7, "mixed orientations"),
        (_compress, 5, "cannot be decoded: no decoder for it is installed: install one of"),
        (_damage_jpeg2000, 5, "cannot be decoded"),
        (_drop_pixels, 2, "holds no pixel data"),
    ],
    ids=["sizes", "orientation", "compressed", "damaged", "no-pixels"],
)
def test_broken_series_are_refused_naming_series_and_problem(
    tmp_path, edit, which, message, caplog
):
    image, _, affine = generate_case(SHAPE, seed=3, lps=False)
    uid = write_ct_series(tmp_path / "s", image, affine)
    edit_slices(tmp_path / "s", uid, edit, which=which)
    with pytest.raises(DataError) as error:
        read_volume(tmp_path / "s")
    text = str(error.value)
    assert text.startswith(f"{tmp_path / 's'}: series {uid} (abdomen, 12 slices)")
    assert message in text and "\n" not in text
    assert not [r for r in caplog.records if r.exc_info], "a decoder's traceback was logged"


def test_missing_slice_is_refused(tmp_path, phantom):
    image, affine = phantom
    write_ct_series(tmp_path / "s", image, affine)
    middle = sorted(list_dicom(tmp_path / "s"), key=_position)[6]
    middle.unlink()
    with pytest.raises(DataError, match=r"11 slices\): missing slices: .*after slice 5"):
        read_volume(tmp_path / "s")


def _position(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return float(ds.ImagePositionPatient[2])


def test_gantry_tilt_is_refused(tmp_path, phantom):
    image, affine = phantom
    write_ct_series(tmp_path / "s", image, affine, tilt_mm_per_slice=1.0)
    with pytest.raises(DataError, match=r"gantry tilt or sheared geometry: .* degrees off"):
        read_volume(tmp_path / "s")


def test_small_position_noise_is_accepted(tmp_path, phantom):
    """Positions rounded by the scanner a hundredth of a voxel off the grid still read."""
    image, affine = phantom
    write_ct_series(tmp_path / "s", image, affine, tilt_mm_per_slice=0.001)
    data, _ = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(data, image)


def test_repeated_positions_are_refused(tmp_path, phantom):
    image, affine = phantom
    uid = write_ct_series(tmp_path / "s", image, affine)
    write_ct_series(tmp_path / "phase2", image, affine)
    for path in list_dicom(tmp_path / "phase2"):  # a second phase filed under the same series
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = uid
        ds.save_as(tmp_path / "s" / f"P{path.name}")
    with pytest.raises(DataError, match=r"12 slices repeat the position of another"):
        read_volume(tmp_path / "s")


def test_folder_without_ct_series_says_what_it_holds(tmp_path):
    write_other_objects(tmp_path)
    with pytest.raises(DataError, match=r"holds no CT image series .*found 1 Secondary Capture"):
        read_volume(tmp_path)


def test_unknown_series_uid_lists_the_series_held(tmp_path, phantom):
    image, affine = phantom
    uid = write_ct_series(tmp_path / "s", image, affine)
    expected = rf"holds no CT series 1\.2\.3; its CT series: series {uid}"
    with pytest.raises(DataError, match=expected):
        read_volume(tmp_path / "s", series_uid="1.2.3")
