"""Output folders and files probed before the work; filesystem errors named with their fix.

Read-only and full disks are simulated by making the probe's ``tempfile.mkstemp`` or ``os.fsync``
raise the ``OSError`` the kernel would (so the tests also run as root, where ``chmod`` does not
block writes); one test uses a real read-only folder and is skipped as root; ``/dev/full`` gives a
real "No space left on device".
"""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import pytest
import torch

from liverseg import checkpoints
from liverseg.checkpoints import load_checkpoint, save_checkpoint
from liverseg.io import atomic_path
from liverseg.writable import (
    FILESYSTEM_FIXES,
    PROBE_PREFIX,
    UnwritableError,
    check_writable_dir,
    check_writable_file,
    describe_os_error,
    final_path,
)


def fail_with(code: int, filename=lambda *args, **kwargs: None):
    """A stand-in for a filesystem call: raises ``OSError(code)`` naming ``filename(*args)``."""

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), filename(*args, **kwargs))

    return fail


def probe_name(*args, dir, **kwargs) -> str:
    """The file ``tempfile.mkstemp(dir=...)`` would have created."""
    return str(Path(dir) / f"{PROBE_PREFIX}abcd1234")


def everything_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def test_a_writable_folder_passes_and_is_left_as_it_was(tmp_path):
    (tmp_path / "kept.txt").write_text("x")
    assert check_writable_dir(tmp_path, "--out") == tmp_path
    assert everything_under(tmp_path) == [tmp_path / "kept.txt"]


def test_missing_folders_are_probed_then_removed(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    assert check_writable_dir(out, "--out") == out
    assert everything_under(tmp_path) == []
    assert check_writable_file(out / "metrics.csv", "--out") == out / "metrics.csv"
    assert everything_under(tmp_path) == []


def test_a_file_where_a_folder_is_needed(tmp_path):
    blocker = tmp_path / "preds"
    blocker.write_text("not a folder")
    with pytest.raises(UnwritableError, match=r"--out .*preds is a file; give a folder"):
        check_writable_dir(blocker, "--out")
    with pytest.raises(UnwritableError, match=r"preds/x/y: .*preds is a file, not a folder"):
        check_writable_dir(blocker / "x" / "y", "--out")
    with pytest.raises(UnwritableError, match=r"preds/metrics.csv: .*preds is a file"):
        check_writable_file(blocker / "metrics.csv", "--out")
    assert blocker.read_text() == "not a folder"


def test_a_folder_where_a_file_is_needed(tmp_path):
    with pytest.raises(UnwritableError, match=r"is a folder; give a file name, e.g. .*metrics.csv"):
        check_writable_file(tmp_path, "--out", example_name="metrics.csv")


@pytest.mark.parametrize(
    ("code", "fix"),
    [(errno.EROFS, "writable disk"), (errno.EACCES, "permissions"), (errno.EDQUOT, "quota")],
)
def test_an_unwritable_folder_is_named_with_its_fix(tmp_path, monkeypatch, code, fix):
    monkeypatch.setattr("tempfile.mkstemp", fail_with(code, probe_name))
    out = tmp_path / "new" / "out"
    with pytest.raises(UnwritableError) as caught:
        check_writable_dir(out, "--out")
    message = str(caught.value)
    assert message.startswith(f"cannot write --out {out}: {os.strerror(code)}; "), message
    assert fix in message and "\n" not in message
    assert caught.value.path == out
    assert everything_under(tmp_path) == []  # the folders made for the probe are gone


def test_a_full_disk_is_found_by_the_probe(tmp_path, monkeypatch):
    monkeypatch.setattr("os.fsync", fail_with(errno.ENOSPC))
    with pytest.raises(UnwritableError, match="No space left on device; free space"):
        check_writable_file(tmp_path / "case.gif", "animation output")
    assert everything_under(tmp_path) == []  # the probe file is removed


def test_a_real_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        try:
            (folder / "probe").write_text("x")
        except PermissionError:
            pass
        else:
            pytest.skip("running as root: chmod does not block writes (simulated above)")
        with pytest.raises(UnwritableError, match="Permission denied; check its permissions"):
            check_writable_dir(folder / "out", "--out")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("code", sorted(FILESYSTEM_FIXES))
def test_every_filesystem_error_is_one_line_with_path_and_fix(code):
    exc = OSError(code, os.strerror(code), "/data/run/metrics.csv")
    line = describe_os_error(exc)
    assert line == f"/data/run/metrics.csv: {os.strerror(code)}; {FILESYSTEM_FIXES[code]}"


def test_other_os_errors_are_not_described():
    assert describe_os_error(OSError(errno.EIO, "Input/output error", "x")) is None
    assert describe_os_error(OSError("no errno")) is None


def test_a_temporary_name_of_atomic_path_is_shown_as_the_file_being_written(tmp_path):
    target = tmp_path / "checkpoints" / "last.pt"
    with atomic_path(target) as tmp:
        assert tmp.name != target.name
        assert final_path(tmp) == target
        exc = OSError(errno.ENOSPC, "No space left on device", str(tmp))
        assert describe_os_error(exc).startswith(f"{target}: No space left on device; ")
    assert final_path(tmp_path / "plain.pt") == tmp_path / "plain.pt"
    assert not final_path(tmp_path / f"{PROBE_PREFIX}abc").name.endswith(".tmp")


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    last = save_checkpoint(tmp_path / "last.pt", model={}, config={}, preprocessing={}, epoch=1)
    monkeypatch.setattr(checkpoints.torch, "save", fail_with(errno.ENOSPC, lambda _, f: f.name))
    with pytest.raises(UnwritableError) as caught:
        save_checkpoint(last, model={}, config={}, preprocessing={}, epoch=2)
    message = str(caught.value)
    assert message.startswith(f"cannot write checkpoint {last}: No space left on device; free")
    assert "left as it was" in message
    assert load_checkpoint(last)["epoch"] == 1
    assert everything_under(tmp_path) == [last]  # no temporary file left behind


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_real_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch):
    """torch.save(path) reports a full disk as an opaque RuntimeError; through a file, ENOSPC."""
    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        return real_open("/dev/full", mode, *args, **kwargs)

    # The module's own open(): builtins.open stays untouched.
    monkeypatch.setattr(checkpoints, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(UnwritableError, match=r"last.pt: No space left on device"):
        save_checkpoint(tmp_path / "last.pt", model={"w": torch.zeros(100_000)}, epoch=1)
    assert everything_under(tmp_path) == []
