"""Averaging of sharded checkpoints: zarr (Megatron layout) and torch.distributed.checkpoint directories."""

import enum
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import types
import zipfile
from pathlib import Path
from typing import Optional

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import zarr

from caiman_asr_train.core.errors import CheckpointError, UserError
from caiman_asr_train.export import checkpoint_averaging as ca
from caiman_asr_train.export import sharded_dcp
from caiman_asr_train.export.averaging_kernels import WeightedSum
from caiman_asr_train.export.sharded_averaging import (
    STACK_BYTES,
    average_sharded,
    not_cached,
    round_half_even,
    slice_elements,
    storage_dtype,
    stored_bits,
)
from caiman_asr_train.export.sharded_dcp import DATA_FILE, read_metadata
from caiman_asr_train.export.sharded_distcp import _data_start, locate, read_rows, tensor_pickle, write_item
from caiman_asr_train.utils.cli import run_cli
from caiman_asr_train.utils.page_cache import evict

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SLICE = slice_elements(2, 2)  # elements of each of two 16-bit inputs averaged at a time

MEGATRON_METADATA = {
    "sharded_backend": "zarr",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def quiet(_: str) -> None:
    pass


# --- zarr fixtures: Megatron's .zarray fields, written by tensorstore and zarr-python ---------------


def write_ts_array(
    path: Path, values: np.ndarray, chunks: list[int], dtype: str, compressor: Optional[dict] = None
) -> None:
    """A zarr v2 array as Megatron writes it: raw chunks (no compressor by default), '.' separator."""
    metadata = {
        "shape": list(values.shape),
        "chunks": chunks,
        "dtype": dtype,
        "compressor": compressor,
        "fill_value": None,
        "order": "C",
        "filters": None,
        "dimension_separator": ".",
        "zarr_format": 2,
    }
    array = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}, "metadata": metadata},
        create=True,
    ).result()
    array.write(values).result()


def zarr_checkpoint(directory: Path, seed: int, *, optimizer: bool = True) -> dict:
    """A Megatron-layout zarr checkpoint; returns its float arrays as float64 numpy."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    arrays = {
        "decoder.weight": rng.standard_normal((5, 6)).astype(ml_dtypes.bfloat16),
        "decoder.bias": rng.standard_normal(7).astype(np.float16),
    }
    write_ts_array(directory / "decoder.weight", arrays["decoder.weight"], [2, 4], "bfloat16")
    write_ts_array(directory / "decoder.bias", arrays["decoder.bias"], [3], "<f2")
    fp32 = rng.standard_normal((4, 3)).astype(np.float32)
    zarr.create_array(
        store=str(directory / "embedding.weight"),
        shape=fp32.shape,
        chunks=(2, 3),
        dtype="<f4",
        zarr_format=2,
        compressors=None,
        fill_value=None,
    )[...] = fp32
    arrays["embedding.weight"] = fp32
    write_ts_array(directory / "decoder.counter", np.array([seed, seed], dtype=np.int64), [2], "<i8")
    if optimizer:
        write_ts_array(directory / "optimizer.state.exp_avg", np.full(3, seed, dtype=np.float32), [3], "<f4")
    torch.save({"seed": seed}, directory / "common.pt")
    (directory / "decoder.extra_state").mkdir()
    (directory / "decoder.extra_state" / "shard_0_1.pt").write_bytes(f"extra {seed}".encode())
    (directory / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}


def read_ts(path: Path) -> np.ndarray:
    return (
        ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}).result().read().result()
    )


def reference(values: list[dict], weights: list[float], key: str, dtype) -> np.ndarray:
    total = sum(w * v[key] for v, w in zip(values, weights))
    return round_half_even(torch.from_numpy(total), dtype)


def assert_array(path: Path, expected: torch.Tensor) -> None:
    stored = read_ts(path)
    if stored.dtype == ml_dtypes.bfloat16:
        stored = torch.from_numpy(stored.view(np.uint16)).view(torch.bfloat16)
    else:
        stored = torch.from_numpy(stored)
    assert stored.dtype == expected.dtype
    assert torch.equal(stored, expected)


@pytest.mark.parametrize("weights, expected_weights", [(None, [0.5, 0.5]), ([3.0, 1.0], [0.75, 0.25])])
def test_zarr_average_equals_the_float64_reference_and_keeps_dtypes(tmp_path, weights, expected_weights):
    values = [zarr_checkpoint(tmp_path / f"ck-step={s}", seed=s) for s in (1, 2)]
    out = tmp_path / "out"
    record = average_sharded([tmp_path / "ck-step=1", tmp_path / "ck-step=2"], out, weights, log=quiet)
    assert record["weights"] == expected_weights
    dtypes = {
        "decoder.weight": torch.bfloat16,
        "decoder.bias": torch.float16,
        "embedding.weight": torch.float32,
    }
    for key, dtype in dtypes.items():
        assert_array(out / key, reference(values, expected_weights, key, dtype))
    keeper = tmp_path / ("ck-step=1" if weights else "ck-step=2")  # ties go to the newer step
    assert list(read_ts(out / "decoder.counter")) == list(read_ts(keeper / "decoder.counter"))
    assert torch.load(out / "common.pt", weights_only=True) == torch.load(
        keeper / "common.pt", weights_only=True
    )
    assert (out / "decoder.extra_state/shard_0_1.pt").read_bytes() == (
        keeper / "decoder.extra_state/shard_0_1.pt"
    ).read_bytes()
    assert not (out / "optimizer.state.exp_avg").exists()
    assert json.loads((out / "metadata.json").read_text()) == MEGATRON_METADATA
    assert json.loads((out / "averaging.json").read_text())["steps"] == [1, 2]


def test_inverse_wer_weights_come_from_nemo_names(tmp_path):
    names = ["m--val_wer=0.1-step=100", "m--val_wer=0.3-step=200"]
    values = [zarr_checkpoint(tmp_path / n, seed=i) for i, n in enumerate(names)]
    record = average_sharded([tmp_path / n for n in names], tmp_path / "out", log=quiet)
    inverse = [1 / 0.11, 1 / 0.31]
    expected = [w / sum(inverse) for w in inverse]
    assert record["weighting"] == "inverse_wer" and record["weights"] == pytest.approx(expected)
    assert_array(
        tmp_path / "out/embedding.weight",
        reference(values, record["weights"], "embedding.weight", torch.float32),
    )


def test_compressed_arrays_are_decoded_and_averaged_too(tmp_path):
    values = []
    for seed in (1, 2):
        directory = tmp_path / f"z{seed}"
        directory.mkdir()
        (directory / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
        array = np.random.default_rng(seed).standard_normal((5, 3)).astype(ml_dtypes.bfloat16)
        write_ts_array(directory / "w", array, [2, 3], "bfloat16", compressor={"id": "zlib", "level": 1})
        values.append({"w": np.asarray(array, dtype=np.float64)})
    average_sharded([tmp_path / "z1", tmp_path / "z2"], tmp_path / "out", log=quiet)
    assert json.loads((tmp_path / "out/w/.zarray").read_text())["compressor"]["id"] == "zlib"
    assert_array(tmp_path / "out/w", reference(values, [0.5, 0.5], "w", torch.bfloat16))


def test_a_truncated_chunk_file_is_refused_naming_it(tmp_path):
    zarr_checkpoint(tmp_path / "a", seed=1)
    zarr_checkpoint(tmp_path / "b", seed=2)
    chunk = tmp_path / "b/decoder.weight/0.0"
    chunk.write_bytes(chunk.read_bytes()[:-2])
    with pytest.raises(
        CheckpointError, match=r"b: array 'decoder\.weight' chunk '0\.0' has 14 bytes, not 16"
    ):
        average_sharded([tmp_path / "a", tmp_path / "b"], tmp_path / "out", log=quiet)


def test_bfloat16_rounds_once_to_nearest_even():
    # 1 + 2**-8 + 2**-30: through float32 it becomes the tie 1 + 2**-8 and rounds down to 1.0.
    x = torch.tensor([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 1 + 2**-8, 3.0], dtype=torch.float64)
    assert x.to(torch.bfloat16)[0].item() == 1.0  # torch's own cast rounds twice
    assert round_half_even(x, torch.bfloat16).tolist() == [1 + 2**-7, -(1 + 2**-7), 1.0, 3.0]
    y = torch.tensor([1 + 2**-11 + 2**-30], dtype=torch.float64)
    assert round_half_even(y, torch.float16).item() == 1 + 2**-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_kernels_round_like_the_reference(dtype):
    """Ties, double-rounding traps, subnormals, zeros and overflow, then random values of every magnitude."""
    crafted = [1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11 + 2**-40]
    crafted += [0.0, -0.0, 2.0**-126 - 2.0**-134, 1e-39, -3e-41, 2.0**-149, 6e-8, 3.3e38, 3.4e38, 1e300]
    rng = np.random.default_rng(0)
    randoms = rng.standard_normal(SLICE - len(crafted)) * np.exp2(
        rng.integers(-140, 130, SLICE - len(crafted))
    )
    total = np.array(crafted + list(randoms))
    out = np.empty(SLICE, storage_dtype(dtype))
    assert WeightedSum(dtype).round_into(out, total)  # finite sums (beyond the range: infinity)
    expected = round_half_even(torch.from_numpy(total), dtype)
    assert np.array_equal(out.view(np.uint8), stored_bits(expected).view(np.uint8))
    total[SLICE // 2] = np.nan
    assert not WeightedSum(dtype).round_into(out, total)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_the_stacked_kernel_sums_inputs_in_order_in_float64_and_finds_non_finite_values(dtype):
    rng = np.random.default_rng(1)
    values = torch.from_numpy(rng.standard_normal((5, 10_007)) * np.exp2(rng.integers(-12, 12, (5, 10_007))))
    stored = values.to(dtype)
    stack = stored_bits(stored).reshape(stored.shape)
    weights = np.array([0.1, 0.3, 0.05, 0.35, 0.2])
    out = np.empty(stack.shape[1], stack.dtype)
    assert WeightedSum(dtype).average(out, stack, weights)
    reference = torch.zeros(stack.shape[1], dtype=torch.float64)
    for row, weight in zip(stored, weights):
        reference += float(weight) * row.double()  # each product rounded, then added: numpy's order
    assert np.array_equal(out, stored_bits(round_half_even(reference, dtype)))
    total = np.empty(stack.shape[1])
    for i, (row, weight) in enumerate(zip(stack, weights)):
        WeightedSum(dtype).add(total, row, weight, i == 0)
    assert np.array_equal(total, reference.numpy())
    stored[3, 4321] = float("inf")
    stack = stored_bits(stored).reshape(stored.shape)
    assert not WeightedSum(dtype).average(out, stack, weights)


def test_chunks_longer_than_a_slice_and_edge_chunks_average_exactly(tmp_path):
    values = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        directory = tmp_path / f"ck-step={seed}"
        directory.mkdir()
        chunk_rows = SLICE // 250 + 50  # chunks of more than SLICE elements, and a shorter edge chunk
        matrix = rng.standard_normal((chunk_rows + 100, 250)).astype(ml_dtypes.bfloat16)
        vector = rng.standard_normal(2 * SLICE + 5).astype(np.float16)
        write_ts_array(directory / "w", matrix, [chunk_rows, 250], "bfloat16")
        write_ts_array(directory / "v", vector, [SLICE + 7], "<f2")
        (directory / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
        values.append({"w": matrix.astype(np.float64), "v": vector.astype(np.float64)})
    out = tmp_path / "out"
    average_sharded([tmp_path / "ck-step=1", tmp_path / "ck-step=2"], out, [3.0, 1.0], log=quiet)
    assert_array(out / "w", reference(values, [0.75, 0.25], "w", torch.bfloat16))
    assert_array(out / "v", reference(values, [0.75, 0.25], "v", torch.float16))


def test_keep_optimizer_copies_it_with_a_warning(tmp_path):
    for s in (1, 2):
        zarr_checkpoint(tmp_path / f"c-step={s}", seed=s)
    lines = []
    average_sharded(
        [tmp_path / "c-step=1", tmp_path / "c-step=2"],
        tmp_path / "out",
        [1, 2],
        keep_optimizer=True,
        log=lines.append,
    )
    assert list(read_ts(tmp_path / "out/optimizer.state.exp_avg")) == [2.0, 2.0, 2.0]
    assert any(line.startswith("warning: --keep_optimizer") for line in lines)


def add_extra_array(d: Path) -> None:
    write_ts_array(d / "decoder.bias2", np.zeros(3, np.float16), [3], "<f2")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: shutil.rmtree(d / "decoder.bias"),
            r"b: no array 'decoder\.bias' \(which .*a has\)",
        ),
        (add_extra_array, r"a: no array 'decoder\.bias2'"),
        (
            lambda d: _rewrite(d, "decoder.bias", np.zeros(8, np.float16), [3], "<f2"),
            r"b: array 'decoder\.bias' has shape \[8\]",
        ),
        (
            lambda d: _rewrite(d, "decoder.bias", np.zeros(7, np.float32), [3], "<f4"),
            r"b: array 'decoder\.bias' has dtype <f4",
        ),
        (
            lambda d: _rewrite(d, "decoder.bias", np.zeros(7, np.float16), [4], "<f2"),
            r"b: array 'decoder\.bias' has chunks \[4\]",
        ),
        (
            lambda d: (d / "decoder.weight/1.1").unlink(),
            r"b: array 'decoder\.weight' has no chunk file '1\.1'",
        ),
    ],
)
def test_mismatched_zarr_inputs_are_refused_naming_directory_and_key(tmp_path, change, message):
    zarr_checkpoint(tmp_path / "a", seed=1)
    zarr_checkpoint(tmp_path / "b", seed=2)
    change(tmp_path / "b")
    with pytest.raises(CheckpointError, match=message):
        average_sharded([tmp_path / "a", tmp_path / "b"], tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def _rewrite(directory: Path, key: str, values: np.ndarray, chunks: list[int], dtype: str) -> None:
    shutil.rmtree(directory / key)
    write_ts_array(directory / key, values, chunks, dtype)


def test_non_finite_weights_are_refused_naming_directory_and_key(tmp_path):
    zarr_checkpoint(tmp_path / "a", seed=1)
    zarr_checkpoint(tmp_path / "b", seed=2)
    _rewrite(tmp_path / "b", "decoder.bias", np.full(7, np.nan, np.float16), [3], "<f2")
    with pytest.raises(CheckpointError, match=r"b: 'decoder\.bias' holds NaN or Inf"):
        average_sharded([tmp_path / "a", tmp_path / "b"], tmp_path / "out", log=quiet)
    average_sharded(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "out", [1, 0], log=quiet
    )  # weight 0: skipped


def test_output_equal_to_an_input_or_existing_is_refused(tmp_path):
    zarr_checkpoint(tmp_path / "a", seed=1)
    with pytest.raises(UserError, match="is one of the inputs"):
        average_sharded([tmp_path / "a"], tmp_path / "a", log=quiet)
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists"):
        average_sharded([tmp_path / "a"], tmp_path / "out", log=quiet)


# --- command line: NeMo flags, selection -----------------------------------------------------------


@pytest.fixture
def nemo_dir(tmp_path) -> Path:
    root = tmp_path / "checkpoints"
    for step, wer in ((1000, 0.2), (2000, 0.1), (3000, 0.3)):
        zarr_checkpoint(root / f"gpt--val_wer={wer}-step={step}", seed=step)
    zarr_checkpoint(root / "gpt--val_wer=0.05-step=3000-last", seed=9)
    zarr_checkpoint(root / "gpt--val_wer=0.05-step=3000-EMA", seed=9)
    zarr_checkpoint(root / "other--val_wer=0.05-step=1000", seed=9)
    return root


def run_cli_ok(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: ca.main(argv))
    assert exit_info.value.code == 0


@pytest.mark.parametrize("steps", [["1000,2000"], ["1000", "2000"], ["1000,", "2000"]])
def test_steps_in_both_forms_and_the_nemo_output_name(nemo_dir, steps, capsys):
    run_cli_ok(["--name_prefix", "gpt", "--checkpoint_dir", str(nemo_dir), "--steps", *steps])
    record = json.loads((nemo_dir / "gpt-averaged/averaging.json").read_text())
    assert record["steps"] == [1000, 2000]
    assert "wrote " + str(nemo_dir / "gpt-averaged") in capsys.readouterr().out


def test_selection_excludes_last_ema_other_prefixes_and_earlier_averages(nemo_dir, capsys):
    run_cli_ok(["--name_prefix", "gpt", "--checkpoint_dir", str(nemo_dir), "--top_n", "2"])
    out = capsys.readouterr().out
    assert "excluded  gpt--val_wer=0.05-step=3000-last: a '-last' checkpoint" in out
    assert "excluded  gpt--val_wer=0.05-step=3000-EMA: a '-EMA' checkpoint" in out
    assert "other--" not in out
    record = json.loads((nemo_dir / "gpt-averaged/averaging.json").read_text())
    assert record["steps"] == [2000, 1000]
    run_cli_ok(["--name_prefix", "gpt", "--checkpoint_dir", str(nemo_dir), "--output_name", "again"])
    assert "excluded  gpt-averaged: a '-averaged' checkpoint" in capsys.readouterr().out
    assert json.loads((nemo_dir / "again/averaging.json").read_text())["steps"] == [1000, 2000, 3000]


def test_output_dir_and_name_flags(nemo_dir, tmp_path):
    run_cli_ok(
        [
            "--name_prefix",
            "gpt",
            "--checkpoint_dir",
            str(nemo_dir),
            "--steps",
            "1000",
            "--output_dir",
            str(tmp_path / "avg"),
            "--output_name",
            "mine",
        ]
    )
    assert (tmp_path / "avg/mine/metadata.json").is_file()


def test_sigkill_midway_leaves_no_output_and_a_rerun_completes(tmp_path):
    root = tmp_path / "run"
    for step in (1, 2):
        d = root / f"big-step={step}"
        d.mkdir(parents=True)
        (d / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
        write_ts_array(d / "w", np.ones((400, 64), np.float32), [1, 64], "<f4")  # 400 chunks: a slow run
    argv = [
        sys.executable,
        "-m",
        "caiman_asr_train.export.checkpoint_averaging",
        "--checkpoint_dir",
        str(root),
        "--name_prefix",
        "big",
    ]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while (
        not list(root.glob(".big-averaged.tmp-*/w/*"))
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (root / "big-averaged").exists()
    assert subprocess.run(argv, capture_output=True).returncode == 0
    assert np.array_equal(read_ts(root / "big-averaged/w"), np.ones((400, 64), np.float32))
    assert not list(root.glob(".big-averaged.tmp-*"))


# --- torch.distributed.checkpoint ------------------------------------------------------------------


def dcp_checkpoint(directory: Path, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {
        "model": {"w": torch.randn(6, 4, generator=g).to(torch.bfloat16), "b": torch.randn(5, generator=g)},
        "step": torch.tensor(seed),
        "extra": {"note": f"from {seed}"},
        "optimizer": {"exp_avg": torch.randn(5, generator=g)},
    }
    dcp.save(state, storage_writer=dcp.FileSystemWriter(directory))
    return state


def test_dcp_average_loads_back_with_torch_distributed_checkpoint(tmp_path):
    states = [dcp_checkpoint(tmp_path / f"d-step={s}", seed=s) for s in (1, 2)]
    average_sharded([tmp_path / "d-step=1", tmp_path / "d-step=2"], tmp_path / "out", [1, 3], log=quiet)
    loaded = {
        "model": {"w": torch.empty(6, 4, dtype=torch.bfloat16), "b": torch.empty(5)},
        "step": torch.tensor(0),
    }
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(tmp_path / "out"))
    for key in ("w", "b"):
        total = 0.25 * states[0]["model"][key].double() + 0.75 * states[1]["model"][key].double()
        assert torch.equal(loaded["model"][key], round_half_even(total, states[0]["model"][key].dtype))
    assert int(loaded["step"]) == 2  # integers from the most-weighted input
    metadata = read_metadata(tmp_path / "out")
    assert "extra.note" in metadata.state_dict_metadata
    assert "optimizer.exp_avg" not in metadata.state_dict_metadata
    assert metadata.planner_data["model.w"] == ("model", "w")  # the nested layout that was saved


def test_dcp_tensors_are_averaged_a_block_of_rows_at_a_time_and_round_like_the_reference(
    tmp_path, monkeypatch
):
    """Tensors of several blocks (and a row longer than a block): every read is at most one block."""
    rng = np.random.default_rng(0)
    states = []
    for seed in (1, 2, 3):
        # bfloat16 values near ties: 1 + k/256 + a little, so that rounding twice would differ
        ties = (
            1 + rng.integers(0, 256, (300, 250)) / 256 + rng.choice([2.0**-30, -(2.0**-30), 0.0], (300, 250))
        )
        state = {
            "w": torch.from_numpy(ties * (seed + 0.5)).to(torch.float32).to(torch.bfloat16),
            "v": torch.from_numpy(rng.standard_normal(2 * SLICE + 5)).to(torch.float16),
            "long": torch.from_numpy(rng.standard_normal((2, SLICE + 3))).to(torch.float32),
        }
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / f"d-step={seed}"))
        states.append(state)
    monkeypatch.setattr(sharded_dcp, "READ_BYTES", STACK_BYTES)  # blocks as small as zarr's slices
    # elements of each of the three 16-bit inputs at a time
    block = slice_elements(3, 2, sharded_dcp.READ_BYTES)
    reads = []
    real = sharded_dcp.read_rows
    monkeypatch.setattr(
        sharded_dcp,
        "read_rows",
        lambda fd, chunk, start, stop, out, where: (
            reads.append((stop - start) * chunk.row) or real(fd, chunk, start, stop, out, where)
        ),
    )
    weights = [1.0, 1.0, 1.0]  # thirds: the float64 sums are inexact, as in real averages
    paths = [tmp_path / f"d-step={s}" for s in (1, 2, 3)]
    average_sharded(paths, tmp_path / "out", weights, log=quiet)
    assert max(reads) <= SLICE + 3  # one block (the long tensor's block is one row of SLICE + 3)
    assert sorted(set(reads))[-2:] == [block, SLICE + 3]
    loaded = {k: torch.empty_like(v) for k, v in states[0].items()}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(tmp_path / "out"))
    for key, value in loaded.items():
        total = sum(torch.tensor(1 / 3, dtype=torch.float64) * s[key].double() for s in states)
        assert torch.equal(value, round_half_even(total, value.dtype)), key
    assert not torch.equal(
        loaded["w"], sum(s["w"].double() / 3 for s in states).to(torch.bfloat16)
    )  # torch's own cast, rounding twice, differs


def test_dcp_output_items_are_checked_zip_archives_like_torch_save(tmp_path):
    for seed in (1, 2):
        dcp_checkpoint(tmp_path / f"d-step={seed}", seed=seed)
    average_sharded([tmp_path / "d-step=1", tmp_path / "d-step=2"], tmp_path / "out", log=quiet)
    metadata = read_metadata(tmp_path / "out")
    data = (tmp_path / "out" / DATA_FILE).read_bytes()
    for index, info in metadata.storage_data.items():
        assert info.relative_path == DATA_FILE
        item = data[info.offset : info.offset + info.length]
        if index.fqn == "model.w":
            with zipfile.ZipFile(io.BytesIO(item)) as archive:
                assert archive.testzip() is None  # every CRC is right
                assert archive.read("archive/data.pkl") == tensor_pickle(torch.bfloat16, (6, 4))
            assert torch.load(io.BytesIO(item), weights_only=True).shape == (6, 4)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".metadata", DATA_FILE, "averaging.json"]


def test_the_data_pickle_is_what_torch_save_writes():
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for shape in ((6, 4), (5,), (), (3, 0, 2)):
            saved = io.BytesIO()
            torch.save(torch.zeros(shape, dtype=dtype), saved)
            with zipfile.ZipFile(saved) as archive:
                assert archive.read("archive/data.pkl") == tensor_pickle(dtype, shape)


def test_locate_finds_the_elements_from_the_head_or_else_from_the_zip_directory(tmp_path):
    """A plain item (torch.save's, or written by ``write_item``) is located from its first bytes; a view's
    item (its storage holds more than the tensor) from the zip's directory and ``data.pkl``. Either way
    the rows read from where it points are the tensor's; a damaged item is refused naming it."""
    base = torch.arange(40, dtype=torch.float32).reshape(8, 5)
    items = {"plain": base, "view": base[3:]}  # torch.save keeps the view's whole storage and its offset
    blob = bytearray(b"x" * 100)  # items do not start at the file's beginning
    infos = {}
    for name, tensor in items.items():
        saved = io.BytesIO()
        torch.save(tensor, saved)
        infos[name] = types.SimpleNamespace(relative_path="d.distcp", offset=len(blob), length=saved.tell())
        blob += saved.getvalue()
    rows = base.numpy()

    def blocks(at: int) -> list[np.ndarray]:  # write_item's caller writes the elements where they go
        os.pwrite(file.fileno(), rows.tobytes(), at)
        return [rows]

    with open(tmp_path / "d.distcp", "wb") as file:
        file.write(blob)
        start = file.tell()
        infos["written"] = types.SimpleNamespace(
            relative_path="d.distcp", offset=start, length=write_item(file, torch.float32, (8, 5), blocks)
        )
    items["written"] = base
    blob = (tmp_path / "d.distcp").read_bytes()
    for name, tensor in items.items():
        info = infos[name]
        head = bytes(blob[info.offset : info.offset + 4096])
        assert (_data_start(head, torch.float32, tuple(tensor.shape)) is not None) == (name != "view")
        chunk = locate(tmp_path, "w", info, (0, 0), tuple(tensor.shape), torch.float32)
        out = np.empty(tensor.numel(), np.float32)
        with open(tmp_path / "d.distcp", "rb") as f:
            read_rows(f.fileno(), chunk, 1, tensor.shape[0], out, "w")
        assert np.array_equal(out[: (tensor.shape[0] - 1) * 5], tensor[1:].numpy().ravel())
    damaged = bytearray(blob)
    at = blob.index(b"archive/data/0", infos["plain"].offset) - 30  # the elements' local header
    damaged[at : at + 4] = b"PK\x00\x00"
    (tmp_path / "d.distcp").write_bytes(damaged)
    with pytest.raises(CheckpointError, match=r"'w' in d\.distcp: not a .*re-save the checkpoint"):
        locate(tmp_path, "w", infos["plain"], (0, 0), (8, 5), torch.float32)


def test_dcp_memory_is_a_few_blocks_not_a_tensor(tmp_path):
    """numpy's allocations (which tracemalloc sees) stay below one stored tensor: no whole-tensor sum."""
    for seed in (1, 2, 3):
        g = torch.Generator().manual_seed(seed)
        big = torch.randn(4096, 4096, generator=g).to(torch.bfloat16)  # 32 MiB stored, 128 MiB in float64
        dcp.save({"w": big}, storage_writer=dcp.FileSystemWriter(tmp_path / f"m-step={seed}"))
        del big
    tracemalloc.start()
    try:
        average_sharded([tmp_path / f"m-step={s}" for s in (1, 2, 3)], tmp_path / "out", log=quiet)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (
        peak < 4096 * 4096 * 2
    )  # each thread's few blocks of rows, not one tensor (let alone its float64 sum)


@pytest.mark.skipif(
    not hasattr(os, "RWF_NOWAIT"), reason="page-cache residency is asked with RWF_NOWAIT (Linux)"
)
def test_dcp_chunks_read_from_disk_leave_the_page_cache_and_cached_inputs_stay(tmp_path):
    inputs = [tmp_path / f"c-step={seed}" for seed in (1, 2)]
    for seed, path in enumerate(inputs):
        g = torch.Generator().manual_seed(seed)
        big = torch.randn(2048, 2048, generator=g).to(torch.bfloat16)  # 8 MiB: whole large folios inside
        dcp.save({"w": big}, storage_writer=dcp.FileSystemWriter(path))
    middles = []
    for path in inputs:
        (index, info), *_ = read_metadata(path).storage_data.items()
        chunk = locate(path, "w", info, (0, 0), (2048, 2048), torch.bfloat16)
        middles.append((chunk.path, chunk.data_offset + 2048 * 2048))
    cold, warm = middles
    evict([inputs[0]])
    warm[0].read_bytes()
    if not not_cached(inputs[0] / ".metadata"):
        pytest.skip(
            "this file system keeps its files in memory (tmpfs) or takes no reads that may not wait "
            "(RWF_NOWAIT): nothing is seen read from disk"
        )

    average_sharded(inputs, tmp_path / "out", log=quiet)
    assert not_cached(*cold)  # read from disk, averaged, dropped
    assert not not_cached(*warm)  # was cached: left as it was
    average_sharded(inputs, tmp_path / "again", log=quiet)  # the dropped pages are read again
    assert not_cached(*cold)


def test_non_finite_dcp_inputs_are_refused_naming_directory_and_key(tmp_path):
    dcp_checkpoint(tmp_path / "a", seed=1)
    state = dcp_checkpoint(tmp_path / "b", seed=2)
    state["model"]["b"][3] = float("inf")
    shutil.rmtree(tmp_path / "b")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "b"))
    with pytest.raises(CheckpointError, match=r"b: 'model\.b' holds NaN or Inf"):
        average_sharded([tmp_path / "a", tmp_path / "b"], tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    average_sharded(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "out", [1, 0], log=quiet
    )  # weight 0: skipped


def test_a_truncated_distcp_file_is_refused_naming_it(tmp_path):
    dcp_checkpoint(tmp_path / "a", seed=1)
    dcp_checkpoint(tmp_path / "b", seed=2)
    info = next(i for k, i in read_metadata(tmp_path / "b").storage_data.items() if k.fqn == "model.w")
    data = tmp_path / "b" / info.relative_path
    data.write_bytes(data.read_bytes()[: info.offset + info.length - 10])  # into model.w's archive
    with pytest.raises(CheckpointError, match=r"b: '.*' in __0_0\.distcp is truncated"):
        average_sharded([tmp_path / "a", tmp_path / "b"], tmp_path / "out", log=quiet)


@pytest.mark.parametrize(
    "other, message",
    [
        (
            {"model": {"w": torch.zeros(6, 4, dtype=torch.bfloat16)}},
            r"b: no entry 'model\.b' \(which .*a has\)",
        ),
        (
            {"model": {"w": torch.zeros(6, 5, dtype=torch.bfloat16), "b": torch.zeros(5)}},
            r"b: 'model\.w' has shape \[6, 5\]",
        ),
        ({"model": {"w": torch.zeros(6, 4), "b": torch.zeros(5)}}, r"b: 'model\.w' is torch\.float32"),
    ],
)
def test_mismatched_dcp_inputs_are_refused_naming_directory_and_key(tmp_path, other, message):
    dcp.save(
        {"model": {"w": torch.zeros(6, 4, dtype=torch.bfloat16), "b": torch.zeros(5)}},
        storage_writer=dcp.FileSystemWriter(tmp_path / "a"),
    )
    dcp.save(other, storage_writer=dcp.FileSystemWriter(tmp_path / "b"))
    with pytest.raises(CheckpointError, match=message):
        average_sharded([tmp_path / "a", tmp_path / "b"], tmp_path / "out", log=quiet)


class MegatronPlannerData:  # pickled under a Megatron module name below
    def __init__(self):
        self.payload = {"sharded": True}


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_metadata_is_unpickled_without_running_foreign_code(tmp_path, monkeypatch):
    dcp_checkpoint(tmp_path / "m", seed=1)
    path = tmp_path / "m/.metadata"
    metadata = pickle.loads(path.read_bytes())
    module = "megatron.core.dist_checkpointing.strategies.torch"
    with monkeypatch.context() as patch:
        parts = module.split(".")
        for i in range(1, len(parts)):
            patch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        patch.setitem(sys.modules, module, sys.modules[__name__])
        patch.setattr(MegatronPlannerData, "__module__", module)
        metadata.planner_data = {"mcore": MegatronPlannerData(), "evil": Exploit()}
        path.write_bytes(pickle.dumps(metadata))
    monkeypatch.chdir(tmp_path)
    loaded = read_metadata(tmp_path / "m")
    assert loaded.planner_data["mcore"].state == {"payload": {"sharded": True}}
    assert not (tmp_path / "pwned").exists()
    assert "model.w" in loaded.state_dict_metadata


class _EnumsByGetattr(pickle.Pickler):
    """Pickles enum members as ``getattr(EnumClass, name)``, as Python before 3.11.5 does."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


class _Sentinel:
    pass


class _GetattrOfAClass(pickle.Pickler):
    """Pickles a ``_Sentinel`` as ``getattr(Metadata, "__init__")``: a getattr that is no enum member."""

    def reducer_override(self, obj):
        if isinstance(obj, _Sentinel):
            return getattr, (dcp.metadata.Metadata, "__init__")
        return NotImplemented


def test_metadata_pickled_by_older_pythons_reads_and_getattr_reaches_only_enum_members(tmp_path):
    dcp_checkpoint(tmp_path / "m", seed=1)
    path = tmp_path / "m/.metadata"
    metadata = pickle.loads(path.read_bytes())
    buffer = io.BytesIO()
    _EnumsByGetattr(buffer).dump(metadata)
    assert b"getattr" in buffer.getvalue()
    path.write_bytes(buffer.getvalue())
    loaded = read_metadata(tmp_path / "m")
    properties = loaded.state_dict_metadata["model.w"].properties
    assert properties.memory_format == torch.contiguous_format
    # any other getattr is refused: one line naming the file
    buffer = io.BytesIO()
    _GetattrOfAClass(buffer).dump({"planner_data": _Sentinel()})
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match=r"m/\.metadata: unreadable DCP metadata .*not an enum member"):
        read_metadata(tmp_path / "m")


def _write_sharded(rank: int, init_file: str, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    for seed in (1, 2, 3):
        full = torch.arange(32, dtype=torch.float32).reshape(8, 4) * seed
        state = {  # 1 and 2 split by rows, 3 by columns (saved with another parallelism)
            "model.w": distribute_tensor(full, mesh, [Shard(0 if seed < 3 else 1)]),
            "model.b": torch.full((3,), float(seed)),
        }
        dcp.save(state, storage_writer=dcp.FileSystemWriter(f"{root}/s-step={seed}"))
    dist.destroy_process_group()


def test_dcp_written_by_two_gloo_processes_with_sharded_tensors(tmp_path):
    # Forked, not spawned: the ranks start without importing torch again.
    mp.start_processes(
        _write_sharded, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    chunks = read_metadata(tmp_path / "s-step=1").state_dict_metadata["model.w"].chunks
    assert len(chunks) == 2  # one shard per process
    average_sharded([tmp_path / "s-step=1", tmp_path / "s-step=2"], tmp_path / "out", log=quiet)
    loaded = {"model.w": torch.empty(8, 4), "model.b": torch.empty(3)}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(tmp_path / "out"))
    assert torch.equal(loaded["model.w"], torch.arange(32, dtype=torch.float32).reshape(8, 4) * 1.5)
    assert torch.equal(loaded["model.b"], torch.full((3,), 1.5))
    # Another parallelism: each output chunk is gathered from the other input's overlapping chunks.
    for keeper, weights in (("s-step=3", [1, 3]), ("s-step=1", [3, 1])):
        out = tmp_path / f"mixed-{keeper}"
        average_sharded([tmp_path / "s-step=1", tmp_path / "s-step=3"], out, weights, log=quiet)
        assert read_metadata(out).state_dict_metadata["model.w"].chunks == (
            read_metadata(tmp_path / keeper).state_dict_metadata["model.w"].chunks
        )
        loaded = {"model.w": torch.empty(8, 4), "model.b": torch.empty(3)}
        dcp.load(loaded, storage_reader=dcp.FileSystemReader(out))
        expected = torch.arange(32, dtype=torch.float64).reshape(8, 4) * (weights[0] + 3 * weights[1]) / 4
        assert torch.equal(loaded["model.w"], expected.float())


def test_a_missing_sharded_extra_is_named_with_its_install_command(tmp_path, monkeypatch):
    dcp_checkpoint(tmp_path / "a", seed=1)
    dcp_checkpoint(tmp_path / "b", seed=2)
    for name in [m for m in sys.modules if m.startswith("numba")] + [
        "caiman_asr_train.export.averaging_kernels",
        "caiman_asr_train.export.sharded_dcp",
        "caiman_asr_train.export.sharded_zarr",
    ]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    package = sys.modules["caiman_asr_train.export"]
    for name in ("averaging_kernels", "sharded_dcp", "sharded_zarr"):
        monkeypatch.delattr(package, name, raising=False)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ModuleNotFoundError
    with pytest.raises(UserError, match=r"needs numba.*pip install -e 'training\[sharded\]'"):
        average_sharded([tmp_path / "a", tmp_path / "b"], tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


def test_the_kernels_compile_without_a_writable_cache_directory():
    """Where numba finds no cache directory (a read-only install and home) it refuses cache=True."""
    code = (
        "import numpy as np, torch\n"
        "import numba.core.caching as caching\n"
        "caching.CacheImpl._locator_classes = []  # numba finds no writable cache directory\n"
        "from caiman_asr_train.export.averaging_kernels import WeightedSum\n"
        "out = np.empty(3, np.float32)\n"
        "stack = np.array([[1, 2, 3], [3, 4, 5]], np.float32)\n"
        "assert WeightedSum(torch.float32).average(out, stack, np.array([0.5, 0.5]))\n"
        "print(out.tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[2.0,", "3.0,", "4.0]"]
