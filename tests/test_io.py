import os

import numpy as np
import pytest

from liverseg.io import atomic_path, save_nifti


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
