import gzip
import io
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from liverseg.errors import DataError
from liverseg.io import (
    atomic_path,
    check_data_size,
    list_dicom,
    list_nifti,
    missing_file_reason,
    read_labels,
    read_stored,
    read_volume,
    save_nifti,
)


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_replaces_and_uses_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"
    save_nifti(np.zeros((2, 3, 4), np.uint8), np.eye(4), target)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out.nii.gz"]


# --------------------------------------------------------------------------- headers that lie

# Reads a file with each reader in a fresh process and prints the errors and the peak RSS growth.
READ_AND_MEASURE = """
import resource, sys
from liverseg.errors import DataError
from liverseg.io import read_labels, read_stored, read_volume

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for read in (read_volume, read_labels, read_stored):
    try:
        read(sys.argv[1])
    except DataError as exc:
        print(exc)
    else:
        print("read without error")
print("GROWN_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def write_lying_gzip(path, zeros_mb):
    """A header claiming 1000 x 1000 x 900 float64 (7.2 GB); ``zeros_mb`` of data, cut in half."""
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 900))
    header.set_data_dtype(np.float64)
    buffer = io.BytesIO()
    header.write_to(buffer)
    data = gzip.compress(buffer.getvalue().ljust(352, b"\0") + bytes(zeros_mb * 2**20))
    path.write_bytes(data if zeros_mb == 0 else data[: len(data) // 2])


@pytest.mark.parametrize("zeros_mb", [0, 64])
def test_lying_gzip_header_is_refused_in_bounded_memory(tmp_path, zeros_mb):
    """A ~100-byte file, or a cut-off gzip of 64 MB of data, whose header claims 7.2 GB."""
    path = tmp_path / "liar.nii.gz"
    write_lying_gzip(path, zeros_mb)
    result = subprocess.run(
        [sys.executable, "-c", READ_AND_MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and "read without error" not in result.stdout, result.stdout
    for message in lines[:3]:
        assert message.startswith(f"{path}: the header claims 1000 x 1000 x 900 float64 voxels")
        assert "7,200,000,000 bytes" in message and "copy it again" in message
    if zeros_mb == 0:
        assert path.stat().st_size < 200
        assert "only 352 bytes decompress from it" in lines[0]
    else:
        assert "compressed stream breaks off" in lines[0]
    assert float(lines[3].split()[1]) < 300


def nifti_bytes(array, suffix):
    path = f"/tmp/unused{suffix}"
    image = nib.Nifti1Image(array, np.eye(4))
    file_map = nib.Nifti1Image.make_file_map({"image": path})
    buffer = io.BytesIO()
    file_map["image"].fileobj = buffer
    image.to_file_map(file_map)
    return buffer.getvalue()


def test_truncated_uncompressed_nifti_names_claim_and_bytes_present(tmp_path):
    raw = nifti_bytes(np.arange(20 * 10 * 8, dtype=np.int16).reshape(20, 10, 8), ".nii")
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[:1000])
    for read in (read_volume, read_labels, read_stored):
        with pytest.raises(DataError) as info:
            read(path)
        message = str(info.value)
        assert message.startswith(str(path)) and "20 x 10 x 8 int16" in message
        assert "3,200 bytes after a 352-byte header (3,552 in all)" in message
        assert "the file holds only 1,000 bytes" in message and "truncated" in message


def test_gzip_with_a_header_claiming_more_than_its_complete_data(tmp_path):
    path = tmp_path / "grown.nii.gz"
    raw = bytearray(nifti_bytes(np.zeros((10, 10, 10), np.int16), ".nii"))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)))
    header.set_data_shape((10, 10, 20))
    buffer = io.BytesIO()
    header.write_to(buffer)
    raw[: len(buffer.getvalue())] = buffer.getvalue()
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"only 2,352 bytes decompress from it; the file is trunc"):
        check_data_size(path)


def test_complete_files_pass_the_size_check_however_compressed(tmp_path):
    array = np.arange(12 * 10 * 8, dtype=np.float32).reshape(12, 10, 8)
    raw = nifti_bytes(array, ".nii")
    plain, gz, members = tmp_path / "a.nii", tmp_path / "b.nii.gz", tmp_path / "c.nii.gz"
    plain.write_bytes(raw)
    gz.write_bytes(gzip.compress(raw))
    # Two gzip members: the trailer's size is the last member's, so the data are counted.
    members.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    for path in (plain, gz, members):
        check_data_size(path)
        np.testing.assert_array_equal(read_volume(path)[0], array)


# --------------------------------------------------------------------------- symlinks


def test_broken_and_looping_symlinks_are_listed_and_named_when_read(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    save_nifti(np.zeros((2, 3, 4), np.int16), np.eye(4), folder / "good.nii.gz")
    (folder / "dangling.nii.gz").symlink_to(tmp_path / "moved" / "dangling.nii.gz")
    (folder / "loop.nii.gz").symlink_to("loop.nii.gz")
    (folder / "._hidden.nii.gz").symlink_to("nowhere.nii.gz")
    assert [p.name for p in list_nifti(folder)] == ["dangling.nii.gz", "good.nii.gz", "loop.nii.gz"]
    with pytest.raises(DataError, match=r"dangling.nii.gz: broken symlink: it points to .*moved"):
        read_volume(folder / "dangling.nii.gz")
    with pytest.raises(DataError, match=r"loop.nii.gz: symlink loop"):
        read_stored(folder / "loop.nii.gz")
    assert missing_file_reason(tmp_path / "absent.nii.gz") == "not found"
    assert missing_file_reason(folder) == "a folder, not a file"


def test_nifti2_header_claiming_10_to_the_15_voxels_is_refused_without_allocating(tmp_path):
    # NIfTI-1 dimensions stop at 32767; NIfTI-2 can claim 100000^3 float64 (8 PB) in 644 bytes.
    header = nib.Nifti2Header()
    header.set_data_shape((100000, 100000, 100000))
    header.set_data_dtype(np.float64)
    header["vox_offset"] = 544
    path = tmp_path / "huge.nii"
    block = header.binaryblock
    path.write_bytes(block + b"\0" * (544 - len(block)) + b"\0" * 100)
    with pytest.raises(DataError, match=r"huge\.nii: the header claims 100000 x 100000 x 100000"):
        read_volume(path)


# --------------------------------------------------------------------------- DICOM folders


def test_dicom_files_are_told_by_their_preamble_not_their_name(tmp_path):
    (tmp_path / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (tmp_path / "notes.dcm").write_bytes(b"not DICOM" * 30)
    (tmp_path / "._IM0001").write_bytes(b"\0" * 128 + b"DICM")
    assert list_dicom(tmp_path) == [tmp_path / "IM0001"]


def test_folder_without_dicom_files_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match="folder without DICOM files"):
        read_volume(tmp_path)


def test_missing_pydicom_asks_for_the_extra(tmp_path, monkeypatch):
    (tmp_path / "slice").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    monkeypatch.delitem(sys.modules, "liverseg.io.dicom", raising=False)
    with pytest.raises(DataError, match=r"needs pydicom 3 \(.*\): pip install 'liverseg\[dicom\]'"):
        read_volume(tmp_path)
