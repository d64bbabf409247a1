"""Training checkpoints: docs/formats.md section 8 contents, crash safety, retention, resume and safe loading."""

import dataclasses
import enum
import hashlib
import os
import pickle
import random
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.export import checkpointer as checkpointer_module
from caiman_asr_train.export.checkpointer import (
    Checkpointer,
    asset_sha256,
    is_training_checkpoint,
    load_weights,
    read_checkpoint,
    recorded_config,
)
from caiman_asr_train.rnnt import config
from caiman_asr_train.rnnt.model import RNNT

SPEC_KEYS = {
    "epoch": int,
    "step": int,
    "best_wer": float,
    "state_dict": dict,
    "ema_state_dict": dict,
    "optimizer": dict,
    "tokenizer_kw": dict,
    "logmel_norm_weight": float,
}


class Unk(enum.Enum):
    FAIL = "fail"


def pickle_protocol(path: Path) -> int:
    """The protocol of the pickle inside a torch zip file (its first two bytes are PROTO n)."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        header = archive.read(name)[:2]
    assert header[0] == 0x80
    return header[1]


def tmp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp"))


def test_step_file_holds_spec_keys_as_plain_types(export_env):
    rng_state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    draws = (torch.rand(3), np.random.rand(3), random.random())
    path = export_env.save(
        tokenizer_kw={
            "sentpiece_model": export_env.spm_path,
            "labels": ["a"],
            "sampling": 0.0,
            "unk": Unk.FAIL,
        },
        dev_wer=np.float64(0.5),
        rng_state=rng_state,
        data_state={"epoch_offset": np.int64(7), "order": np.arange(5)},
        config_text=export_env.config_path.read_text(),
    )
    assert path == export_env.checkpointer.step_path(10) and path.name == "RNN-T_step10_checkpoint.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key, kind in SPEC_KEYS.items():
        assert isinstance(ckpt[key], kind), key
    assert pickle_protocol(path) == 2
    assert ckpt["tokenizer_kw"]["sentpiece_model"] == str(export_env.spm_path)
    assert ckpt["tokenizer_kw"]["unk"] == "fail"
    assert type(ckpt["dev_wer"]) is float and type(ckpt["data_state"]["epoch_offset"]) is int
    assert torch.equal(ckpt["data_state"]["order"], torch.arange(5))
    assert ckpt["config_path"] == str(export_env.config_path)
    assert ckpt["config_text"] == export_env.config_path.read_text()
    # The stored RNG states reproduce the same draws: exact resume is possible.
    saved = ckpt["rng_state"]
    torch.set_rng_state(saved["torch"])
    np.random.set_state((saved["numpy"][0], saved["numpy"][1].numpy(), *saved["numpy"][2:]))
    random.setstate(saved["python"])
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]
    assert list(ckpt["state_dict"]) == list(export_env.model.state_dict())
    for name, tensor in export_env.ema.state_dict().items():
        assert torch.equal(ckpt["ema_state_dict"][name], tensor)
        assert torch.equal(ckpt["state_dict"][name], export_env.model.state_dict()[name])


def test_best_last_and_explicit_paths(export_env):
    ckpt = export_env.checkpointer
    assert (
        export_env.checkpointer.save(
            export_env.model, export_env.ema, None, 1, 5, 0.3, {}, 1.0, None, is_best=True
        )
        == ckpt.best_path
    )
    assert (
        ckpt.save(export_env.model, export_env.ema, None, 1, 5, 0.3, {}, 1.0, None, is_last=True)
        == ckpt.last_path
    )
    elsewhere = export_env.dir / "other" / "x.pt"
    assert export_env.save(path=elsewhere) == elsewhere
    assert {p.name for p in ckpt.save_dir.iterdir()} == {
        "RNN-T_step10_checkpoint.pt",
        "RNN-T_best_checkpoint.pt",
        "RNN-T_last_checkpoint.pt",
    }
    for path in (ckpt.best_path, ckpt.last_path, elsewhere):
        assert torch.load(path, weights_only=True)["optimizer"] is None or path == elsewhere
    with pytest.raises(ValueError, match="at most one"):
        ckpt.save(
            export_env.model, export_env.ema, None, 1, 5, 0.3, {}, 1.0, None, is_best=True, is_last=True
        )


def test_keep_last_n_deletes_only_the_oldest_step_files(export_env):
    ckpt = Checkpointer(export_env.checkpointer.save_dir, keep_last_n=2)
    args = (export_env.model, export_env.ema, export_env.optimizer)
    ckpt.save(*args, 0, 1, 0.9, {}, 1.0, None, is_best=True)
    ckpt.save(*args, 0, 1, 0.9, {}, 1.0, None, is_last=True)
    other_run = ckpt.save_dir / "other_step1_checkpoint.pt"
    other_run.write_bytes(b"not ours")
    for step in (20, 30, 40, 50):
        ckpt.save(*args, 0, step, 0.9, {}, 1.0, None)
    names = {p.name for p in ckpt.save_dir.iterdir()}
    assert names == {
        "RNN-T_step40_checkpoint.pt",
        "RNN-T_step50_checkpoint.pt",
        "RNN-T_best_checkpoint.pt",
        "RNN-T_last_checkpoint.pt",
        "other_step1_checkpoint.pt",
    }
    with pytest.raises(ValueError):
        Checkpointer(ckpt.save_dir, keep_last_n=0)


def test_a_failed_save_deletes_no_older_checkpoint(export_env, monkeypatch):
    ckpt = Checkpointer(export_env.checkpointer.save_dir, keep_last_n=1)

    def disk_full(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointer_module, "atomic_torch_save", disk_full)
    with pytest.raises(OSError):
        ckpt.save(export_env.model, export_env.ema, None, 0, 11, 0.9, {}, 1.0, None)
    assert [step for step, _ in ckpt.step_files()] == [10]
    read_checkpoint(ckpt.step_path(10))


# 8 MB per checkpoint: a save takes tens of milliseconds, so random kills land inside writes.
PAYLOAD_NUMEL = 2_000_000


def _save_forever(directory: Path) -> None:
    """Child process body: save checkpoints of growing step with a payload equal to the step."""
    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 3)
    ckpt = Checkpointer(directory, keep_last_n=2)
    step = 1
    while True:
        ckpt.save(
            model, model, None, 0, step, 1.0, {}, 1.0, None, payload=torch.full((PAYLOAD_NUMEL,), float(step))
        )
        step += 1


def _assert_complete(path: Path) -> int:
    checkpoint = read_checkpoint(path, mmap=False)
    payload = checkpoint["payload"]
    assert payload.numel() == PAYLOAD_NUMEL and bool((payload == checkpoint["step"]).all()), path
    return checkpoint["step"]


def test_sigkill_during_save_never_leaves_a_partial_file(tmp_path):
    directory = tmp_path / "run"
    model = torch.nn.Linear(4, 3)
    Checkpointer(directory).save(
        model, model, None, 0, 0, 1.0, {}, 1.0, None, payload=torch.zeros(PAYLOAD_NUMEL)
    )
    rng = random.Random(1234)
    killed_mid_write = 0
    for _ in range(8):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _save_forever(directory)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        killed_mid_write += bool(tmp_files(directory))
        # Under every final name there is a complete checkpoint, and the newest stays usable.
        for _, path in Checkpointer(directory).step_files():
            _assert_complete(path)
        newest = Checkpointer(directory).last_checkpoint()
        assert newest is not None
        _assert_complete(newest)
        for leftover in tmp_files(directory):
            leftover.unlink()
    # Most kills land inside a save (the child does nothing else): the test did hit writes.
    assert killed_mid_write >= 1


def test_last_checkpoint_skips_a_truncated_newest_file(export_env):
    ckpt = export_env.checkpointer
    export_env.save(step=20)
    newest = export_env.save(step=30)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="RNN-T_step30_checkpoint.pt"):
        assert ckpt.last_checkpoint() == ckpt.step_path(20)
    newest.write_bytes(b"")
    with pytest.warns(UserWarning):
        assert ckpt.last_checkpoint() == ckpt.step_path(20)


def test_last_checkpoint_is_the_newest_step_or_last_file(export_env, tmp_path):
    assert Checkpointer(tmp_path / "missing").last_checkpoint() is None
    ckpt = export_env.checkpointer
    assert ckpt.last_checkpoint() == ckpt.step_path(10)
    export_env.save(step=9)
    export_env.save(step=100)
    assert ckpt.last_checkpoint() == ckpt.step_path(100)
    ckpt.save(export_env.model, export_env.ema, None, 4, 150, 0.2, {}, 1.0, None, is_last=True)
    assert ckpt.last_checkpoint() == ckpt.last_path
    export_env.save(step=200)
    assert ckpt.last_checkpoint() == ckpt.step_path(200)
    # The best file is never a resume point: it may be older than the newest state.
    ckpt.save(export_env.model, export_env.ema, None, 4, 500, 0.1, {}, 1.0, None, is_best=True)
    assert ckpt.last_checkpoint() == ckpt.step_path(200)


def test_load_restores_model_ema_and_optimizer(export_env):
    fresh_model, fresh_ema = export_env.fresh_models()
    assert not torch.equal(fresh_model.joint_enc.weight, export_env.model.joint_enc.weight)
    optimizer = torch.optim.Adam(fresh_model.parameters(), lr=1e-3)
    ckpt = export_env.checkpointer.load(export_env.ckpt_path, fresh_model, fresh_ema, optimizer)
    assert ckpt["step"] == 10 and ckpt["epoch"] == 3
    for (name, a), b in zip(export_env.model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(export_env.ema.state_dict().values(), fresh_ema.state_dict().values()):
        assert torch.equal(a, b)
    expected = export_env.optimizer.state_dict()["state"]
    restored = optimizer.state_dict()["state"]
    assert expected.keys() == restored.keys()
    for index in expected:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(expected[index][key], restored[index][key])


def test_strict_load_refuses_other_shapes_and_partial_load_reports(export_env):
    other = RNNT(export_env.model.config.n_classes + 3, **config.rnnt(export_env.cfg))
    with pytest.raises(CheckpointError, match="does not fit the model.*strict=False"):
        export_env.checkpointer.load(export_env.ckpt_path, other)
    optimizer = torch.optim.Adam(other.parameters())
    before = optimizer.state_dict()
    with pytest.warns(UserWarning) as caught:
        export_env.checkpointer.load(export_env.ckpt_path, other, optimizer=optimizer, strict=False)
    messages = [str(w.message) for w in caught]
    assert any("partial load" in m for m in messages)
    assert any("optimizer state is not loaded" in m for m in messages)
    report = export_env.checkpointer.load_reports["state_dict"]
    assert report.mismatched == ["prediction.embed.weight", "joint_net.2.weight", "joint_net.2.bias"]
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(other.state_dict()) - 3
    assert torch.equal(other.joint_enc.weight, export_env.model.joint_enc.weight)
    assert optimizer.state_dict() == before


def test_read_checkpoint_refuses_missing_corrupt_and_non_dict_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    torch.save({"x": torch.ones(100)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:-200])
    garbage = []
    for seed in range(20):
        garbage.append(tmp_path / f"garbage{seed}.pt")
        garbage[-1].write_bytes(random.Random(seed).randbytes(2000))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (truncated, empty, *garbage):
        for mmap in (True, False):
            with pytest.raises(CheckpointError, match="truncated or corrupt"):
                read_checkpoint(path, mmap=mmap)
    listing = tmp_path / "list.pt"
    torch.save([1, 2], listing)
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        read_checkpoint(listing)


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_code_running_pickle_is_refused_without_running(tmp_path, export_env):
    marker = tmp_path / "payload_ran"
    in_zip = tmp_path / "evil_zip.pt"
    torch.save({"state_dict": {}, "hook": _RunsCode(marker)}, in_zip)
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps({"hook": _RunsCode(marker)}, protocol=2))
    for path in (in_zip, legacy):
        for mmap in (True, False):
            with pytest.raises(CheckpointError, match=r"refused: it holds a pickled (posix|os)\.system"):
                read_checkpoint(path, mmap=mmap)
        with pytest.raises(CheckpointError, match="refused"):
            export_env.checkpointer.load(path, export_env.model)
    assert not marker.exists()


def _distributed_worker(rank: int, directory: str, results: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{directory}/pg", rank=rank, world_size=2
    )
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
        ckpt = Checkpointer(Path(directory) / "run")
        written = ckpt.save(model, model, None, 0, 7, 1.0, {}, 1.0, None)
        # After save returns on any rank, the file is complete (ranks met at the closing barrier).
        assert ckpt.last_checkpoint() == ckpt.step_path(7)
        other = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
        ckpt.load(ckpt.step_path(7), other)
        pairs = zip(model.module.state_dict().values(), other.module.state_dict().values())
        same = all(torch.equal(a, b) for a, b in pairs)
        Path(results, f"rank{rank}").write_text(f"{written} {same}")
    finally:
        torch.distributed.destroy_process_group()


def test_only_rank_zero_writes_under_torch_distributed(tmp_path):
    import torch.multiprocessing as mp

    results = tmp_path / "results"
    results.mkdir()
    mp.start_processes(_distributed_worker, args=(str(tmp_path), str(results)), nprocs=2, start_method="fork")
    run = tmp_path / "run"
    assert (results / "rank0").read_text() == f"{run / 'RNN-T_step7_checkpoint.pt'} True"
    assert (results / "rank1").read_text() == "None True"
    assert [p.name for p in run.iterdir()] == ["RNN-T_step7_checkpoint.pt"]
    assert list(torch.load(run / "RNN-T_step7_checkpoint.pt", weights_only=True)["state_dict"]) == [
        "weight",
        "bias",
    ]


def test_a_checkpoint_describes_its_own_model_config_and_assets(export_env):
    hashes = asset_sha256(export_env.cfg)
    path = export_env.save(export_env.dir / "described.pt", config=export_env.cfg, asset_sha256=hashes)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model_config"] == dataclasses.asdict(export_env.model.config)
    assert ckpt["config"] == export_env.cfg and recorded_config(ckpt) == export_env.cfg
    assert hashes["sentpiece_model"] == hashlib.sha256(export_env.spm_path.read_bytes()).hexdigest()
    assert set(hashes) == {"sentpiece_model", "melmeans.pt", "melvars.pt"} and ckpt["asset_sha256"] == hashes
    assert is_training_checkpoint(ckpt)
    with pytest.raises(ValueError, match="would overwrite"):
        export_env.save(export_env.dir / "x.pt", model_config={})


def test_load_weights_names_the_tensors_that_do_not_fit(export_env):
    other = RNNT(export_env.model.config.n_classes + 3, **config.rnnt(export_env.cfg))
    with pytest.raises(CheckpointError) as error:
        load_weights(
            other, export_env.model.state_dict(), source="run.pt [state_dict]", hint="use the right config"
        )
    message = str(error.value)
    assert message.startswith("run.pt [state_dict] does not fit the model") and message.endswith(
        "use the right config"
    )
    assert (
        "joint_net.2.weight is [41, 10] in the file, [44, 10] in the model" in message and "\n" not in message
    )
