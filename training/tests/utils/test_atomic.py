"""Atomic writes leave either the old file or the complete new one, with normal permissions."""

import os
import stat

import pytest
import torch

from caiman_asr_train.utils.atomic import atomic_torch_save, atomic_write, atomic_write_bytes


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
