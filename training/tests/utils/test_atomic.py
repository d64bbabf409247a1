"""Atomic writes leave either the old file or the complete new one, with normal permissions."""

import contextlib
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from caiman_asr_train.core.errors import OutputError
from caiman_asr_train.utils.atomic import (
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    replace_directory,
)


def test_written_file_has_umask_permissions(tmp_path):
    path = tmp_path / "out.bin"
    old = os.umask(0o022)
    try:
        atomic_write_bytes(path, b"data")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"data"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, b"old")

    def explode(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, explode)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_torch_save_uses_protocol_2_and_loads_weights_only(tmp_path):
    path = tmp_path / "x.pt"
    atomic_torch_save({"w": torch.ones(2), "step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


@contextlib.contextmanager
def tmpfs(mount: Path, options: str):
    """A tmpfs mounted on ``mount`` for the block; skips the test, printing why, where mounting is not permitted."""
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        reason = f"mounting a tmpfs is not permitted here ({mounted.stderr.decode().strip()})"
        print(reason)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_read_only_directory_is_one_line_naming_the_path(tmp_path):
    directory = tmp_path / "ro"
    if os.geteuid() == 0:
        # root writes through permission bits, so only a read-only file system refuses it.
        context, problem = tmpfs(directory, "ro,size=64k"), "the file system is read-only"
    else:
        directory.mkdir()
        directory.chmod(0o555)
        context, problem = contextlib.nullcontext(), "permission denied"
    with context:
        with pytest.raises(OutputError, match=f"cannot write {directory / 'x.pt'}: {problem}") as error:
            atomic_torch_save({"a": torch.ones(3)}, directory / "x.pt")
        assert "\n" not in str(error.value)
        assert list(directory.iterdir()) == []


def test_an_output_path_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "out.pt").mkdir()
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'out.pt'}: it is a directory"):
        atomic_torch_save({"a": torch.ones(3)}, tmp_path / "out.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_a_full_file_system_is_one_line_and_leaves_no_partial_file(tmp_path):
    """A process file-size limit fails the write as a full disk does, without mounting anything."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys, torch
        from caiman_asr_train.core.errors import OutputError
        from caiman_asr_train.utils.atomic import atomic_torch_save
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            atomic_torch_save({{"w": torch.ones(1_000_000)}}, {str(tmp_path / "big.pt")!r})
        except OutputError as exc:
            print(exc)
            sys.exit(2)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert (
        result.stdout
        == f"cannot write {tmp_path / 'big.pt'}: the file is too large for this file system or process limit; write elsewhere\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_full_tmpfs_is_one_line_and_leaves_no_partial_file(tmp_path):
    with tmpfs(tmp_path / "small", "size=64k") as mount:
        with pytest.raises(
            OutputError, match=f"cannot write {mount / 'big.pt'}: no space left on the device"
        ):
            atomic_torch_save({"w": torch.ones(1_000_000)}, mount / "big.pt")
        assert list(mount.iterdir()) == []


def test_replace_directory_swaps_in_the_built_one_and_leaves_no_sibling(tmp_path):
    target, built = tmp_path / "out", tmp_path / ".out.partial-1"
    target.mkdir()
    (target / "old.txt").write_text("old")
    built.mkdir()
    (built / "new.txt").write_text("new")
    replace_directory(built, target)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    fresh = tmp_path / ".out.partial-2"
    fresh.mkdir()
    replace_directory(fresh, tmp_path / "other")  # no old directory to move aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]
