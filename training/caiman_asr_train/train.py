"""Train an RNN-T: EMA, validation, crash-safe checkpoints, exact resume, and hardware export at the end.

From the repository root:

    ./train.sh                                   # the demo: bootstrap, data, train, export
    python training/caiman_asr_train/train.py --model_config training/configs/base-8703sp.yaml \\
        --dataset_dir /data/LibriSpeech --train_manifests train-clean-100.json \\
        --val_manifests dev-clean.json --num_gpus 8 --global_batch_size 1024 ...
    python -m caiman_asr_train.train --resume    # continue the run in --output_dir

One optimizer step uses ``--global_batch_size`` utterances, split over
``--grad_accumulation_batches`` micro-batches and over processes. After every
step the EMA model is updated; it is validated (greedy WER on the dev
manifests) at step 1, every ``--val_frequency`` steps and at the end, and
saved as ``RNN-T_best_checkpoint.pt`` when its WER improves. When training ends
(or is stopped by SIGTERM/SIGINT) the last checkpoint is saved and the finalize
callbacks run; the built-in one writes ``RNN-T_best_checkpoint.hw.pt`` and
``RNN-T_last_checkpoint.hw.pt``.

Determinism: every random draw of optimizer step N (data order, speed
perturbation, subword sampling, dither, SpecAugment, dropout, gradient noise)
comes from a generator seeded by ``(--seed, N, ...)``, and the data position is
one integer saved in each checkpoint, so on CPU a resumed run reproduces an
uninterrupted one bit for bit.

Exit status: 0 when training finished and the exports succeeded; 1 when an
export failed (the training checkpoints are intact); 128 + signal number after
a clean stop on SIGTERM/SIGINT (resume with ``--resume``); 2 for a usage error.
"""

import argparse
import contextlib
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from caiman_asr_train.core.errors import ConfigError, UserError
from caiman_asr_train.data.dataset import AudioDataset, Batch
from caiman_asr_train.data.feature_cache import FeatureCache, check_covers
from caiman_asr_train.data.features import SpeedPerturbation, norm_weight
from caiman_asr_train.data.sampler import BucketingSampler
from caiman_asr_train.evaluate.decoding import build_decoder, encoder_frame_seconds
from caiman_asr_train.export.checkpointer import Checkpointer, asset_sha256, first_non_finite
from caiman_asr_train.export.hardware_ckpt import hw_path
from caiman_asr_train.rnnt import config
from caiman_asr_train.rnnt.model import RNNT
from caiman_asr_train.train_utils import distributed as dist_utils
from caiman_asr_train.train_utils.args import REPO_DEFAULTS, local_batch_size, parse_args
from caiman_asr_train.train_utils.batches import TrainBatches, TrainItems, filter_train_entries, read_entries
from caiman_asr_train.train_utils.builders import (
    build_model,
    build_pipeline,
    build_tokenizer,
    sample_rate,
    scoring_settings,
    text_settings,
)
from caiman_asr_train.train_utils.callbacks import (
    FinalizeCallback,
    FinalizeContext,
    HardwareExportCallback,
    run_finalize,
    shown_path,
)
from caiman_asr_train.train_utils.conversion import ConversionCallback
from caiman_asr_train.train_utils.ema import update_ema
from caiman_asr_train.train_utils.launcher import launch_local_processes
from caiman_asr_train.train_utils.logger import Throughput, TrainLogger, format_seconds
from caiman_asr_train.train_utils.optim import build_optimizer
from caiman_asr_train.train_utils.rng import Purpose, derive_seed, generator, get_rng_state, set_rng_state
from caiman_asr_train.train_utils.schedule import grad_noise_std, learning_rate
from caiman_asr_train.train_utils.signals import PreemptionHandler
from caiman_asr_train.train_utils.validation import Validator
from caiman_asr_train.utils.atomic import atomic_write
from caiman_asr_train.utils.cli import run_cli
from caiman_asr_train.utils.cores import available_cores, keep_freed_heap
from caiman_asr_train.utils.paths import REPO_ROOT

MODEL_NAME = "RNN-T"


# Default paths are relative to the repository, so ./train.sh works from any directory.
def set_cpu_threads(args: argparse.Namespace, info: dist_utils.DistInfo) -> None:
    """Torch threads of a CPU training process: --cpu_threads, else the cores shared out over processes."""
    cores = available_cores()
    # Leave a core to each loader worker: OpenMP threads that share
    # cores with other busy processes wait for each other at every op.
    torch.set_num_threads(args.cpu_threads or max(1, cores // info.local_world_size - args.num_workers))


def pick_device(choice: str, info: dist_utils.DistInfo) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available; use --device cpu")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or Inf: training stops without saving them."""


class LossModule(torch.nn.Module):
    """``forward`` returns the model's loss, so DistributedDataParallel can wrap it."""

    def __init__(self, model: RNNT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, x_lens, y, y_lens):
        return self.model.loss(x, x_lens, y, y_lens)


def refuse_used_output_dir(output_dir: Path) -> None:
    used = sorted(p.name for p in output_dir.glob(f"{MODEL_NAME}_*checkpoint*.pt"))
    if used:
        raise UserError(
            f"--output_dir {output_dir} already holds checkpoints ({', '.join(used[:3])}"
            f"{', ...' if len(used) > 3 else ''}); pass --resume to continue that run, "
            "or choose an empty --output_dir"
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.num_gpus > 1 and not dist_utils.under_torchrun():
        return launch_local_processes(args.num_gpus, argv)
    device_type = (
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    info = dist_utils.init_distributed(device_type)
    try:
        return Trainer(args, argv, info).run()
    finally:
        dist_utils.cleanup(info)


class Trainer:
    """One training run (one process of it): set-up in ``__init__``, the loop in ``run``."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str], info: dist_utils.DistInfo) -> None:
        self.args = args
        self.dist = info
        self.device = pick_device(args.device, info)
        if self.device.type == "cpu":
            set_cpu_threads(args, info)
            keep_freed_heap()
        self.amp = self.device.type == "cuda" and not args.no_amp
        self.output_dir = Path(args.output_dir)
        self.config_path = Path(args.model_config)
        self.cfg = config.load(self.config_path)
        self.checkpointer = Checkpointer(self.output_dir, model_name=MODEL_NAME, keep_last_n=args.keep_last_n)
        # Built now so that export flags the converter refuses stop the run before it trains.
        self.conversion = ConversionCallback.from_args(args)

        resume_path = self._resume_path()
        if info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        dist_utils.barrier(info)
        self.log = TrainLogger(self.output_dir, enabled=info.is_main)

        self.tokenizer = build_tokenizer(self.cfg, sampling=True)
        self.tokenizer_kw = {**config.tokenizer(self.cfg), "unk": "fail"}
        # Recorded in every checkpoint: exports compare the files against them.
        self.asset_sha256 = asset_sha256(self.cfg)
        self.sample_rate = sample_rate(self.cfg, "train")
        self.train_pipeline = build_pipeline(self.cfg, "train").to(self.device).train()
        self.train_items, self.sampler = self._build_training_data()
        self.batch_size = self.sampler.batch_size

        torch.manual_seed(args.seed)
        self.model = build_model(self.cfg, self.tokenizer).to(self.device)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.validator = self._build_validator()
        self.optimizer = build_optimizer(
            self.model.param_groups(args.lr), args.optimizer, args.lr, args.weight_decay, self.device
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.loss_module = self._build_loss_module()
        noise = self.cfg.get("grad_noise_scheduler") or {}
        self.grad_noise = (
            float(noise.get("noise_level", 0.0)),
            float(noise.get("decay_const", 0.55)),
            int(noise.get("start_step", 0)),
        )
        self.last_wer: Optional[float] = None

        self.step = 0
        self.best_wer = math.inf
        if resume_path is not None:
            self._resume(resume_path)
        elif args.fine_tune:
            self.checkpointer.load(Path(args.ckpt), self.model, self.ema_model)
            self.log.info(f"fine-tuning from {args.ckpt}: weights and EMA loaded, fresh schedule")
        self._write_run_files(argv, resumed=resume_path is not None)
        self.throughput = Throughput(self.step, args.training_steps)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log.info(
            f"model: {n_params:,} parameters, {self.tokenizer.num_labels + 1} classes; device {self.device}"
            f"{' (AMP)' if self.amp else ''}; {info.world_size} process(es), {self.batch_size} utterances per "
            f"micro-batch, {self.sampler.batches_per_epoch // args.grad_accumulation_batches} steps per epoch"
        )

    def _resume_path(self) -> Optional[Path]:
        """The checkpoint ``--resume`` continues from (None without it); a fresh run needs an unused --output_dir."""
        if not self.args.resume:
            if self.output_dir.is_dir():
                refuse_used_output_dir(self.output_dir)
            return None
        path = Path(self.args.ckpt) if self.args.ckpt else self.checkpointer.last_checkpoint()
        if path is None:
            raise UserError(
                f"--resume: no checkpoint in {self.output_dir}; pass --ckpt or start without --resume"
            )
        return path

    def _build_training_data(self) -> tuple[TrainItems, BucketingSampler]:
        """The training utterances (after the config's filters) and the sampler that batches them."""
        args, inp = self.args, config.input(self.cfg, "train")
        all_train = read_entries(args.train_manifests, args.dataset_dir)
        entries = filter_train_entries(all_train, inp)
        self.log.info(
            f"training utterances: {len(entries)} of {len(all_train)} (after duration/length filters)"
        )
        dataset = AudioDataset(
            entries,
            args.dataset_dir,
            self.sample_rate,
            tokenizer=self.tokenizer,
            sample_tokens=config.tokenizer(self.cfg)["sampling"] > 0,
            **text_settings(self.cfg, "train"),
        )
        speed = SpeedPerturbation(**inp["speed_perturbation"]) if inp["speed_perturbation"] else None
        cache = None
        if args.feature_cache:
            if speed is not None:
                raise ConfigError(
                    f"--feature_cache: {self.config_path} sets input_train.speed_perturbation, which changes "
                    "the log-mels every epoch; remove it from the config or train without --feature_cache"
                )
            cache = FeatureCache(args.feature_cache, inp["filterbank_features"])
            check_covers(cache, entries)
        sampler = BucketingSampler(
            dataset.durations,
            local_batch_size(args, self.dist.world_size),
            args.seed,
            args.num_buckets,
            self.dist.rank,
            self.dist.world_size,
        )
        return TrainItems(dataset, speed, cache), sampler

    def _build_validator(self) -> Validator:
        """WER (``--decoder``) on this process's share of the dev manifests, shortest utterances first."""
        args = self.args
        entries = sorted(
            read_entries(args.val_manifests, args.dataset_dir), key=lambda e: e["files"][0]["duration"]
        )
        scoring = scoring_settings(self.cfg)
        pipeline = build_pipeline(self.cfg, "val").to(self.device).eval()
        return Validator(
            dataset=AudioDataset(
                entries[self.dist.rank :: self.dist.world_size],
                args.dataset_dir,
                self.sample_rate,
                **text_settings(self.cfg, "val"),
            ),
            pipeline=pipeline,
            tokenizer=self.tokenizer,
            sample_rate=self.sample_rate,
            final_padding_secs=args.val_final_padding_secs,
            standardize_wer=scoring["standardize"],
            error_rate=scoring["error_rate"],
            batch_size=args.val_batch_size,
            device=self.device,
            dist=self.dist,
            seed=args.seed,
            decoder=build_decoder(
                args,
                self.tokenizer,
                frame_seconds=encoder_frame_seconds(pipeline, self.model, self.sample_rate),
                source=str(self.config_path),
                config_ngram=config.ngram(self.cfg) if "ngram" in self.cfg else None,
            ),
        )

    def _build_loss_module(self) -> torch.nn.Module:
        """The model's loss, wrapped in DistributedDataParallel when there are several processes."""
        loss_module = LossModule(self.model)
        if not self.dist.distributed:
            return loss_module
        return DistributedDataParallel(
            loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )

    def _resume(self, path: Path) -> None:
        state = self.checkpointer.load(path, self.model, self.ema_model, self.optimizer)
        self.step = int(state["step"])
        self.best_wer = float(state["best_wer"])
        if state.get("data_state") is not None:
            self.sampler.load_state_dict(state["data_state"])
        else:
            self.log.info(
                f"{path} has no data position; continuing at micro-batch {self.step * self.args.grad_accumulation_batches}"
            )
            self.sampler.consumed = self.step * self.args.grad_accumulation_batches
        if state.get("rng_state") is not None:
            set_rng_state(state["rng_state"])
        if state.get("grad_scaler") and self.amp:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.log.info(f"resumed from {path} at step {self.step} (best WER {100 * self.best_wer:.2f}%)")

    def _write_run_files(self, argv: Sequence[str], resumed: bool) -> None:
        if not self.dist.is_main:
            return
        name = f"args_resume_step{self.step}.json" if resumed else "args.json"
        record = {"argv": list(argv), "args": vars(self.args)}
        atomic_write(self.output_dir / name, lambda f: f.write(json.dumps(record, indent=2).encode()))
        # The parsed config, whose paths are absolute: --model_config results/model_config.yaml then works.
        text = yaml.safe_dump(self.cfg, sort_keys=False)
        atomic_write(self.output_dir / "model_config.yaml", lambda f: f.write(text.encode()))

    def norm_weight(self) -> float:
        return norm_weight(self.step, self.args.norm_ramp_start_step, self.args.norm_ramp_end_step)

    def save(self, dev_wer: Optional[float], **kind) -> None:
        """Save a checkpoint (``kind``: is_best/is_last); refuse non-finite weights, keeping the older files."""
        for name, module in (("model", self.model), ("EMA", self.ema_model)):
            bad = first_non_finite(module.state_dict())
            if bad is not None:
                raise TrainingDiverged(f"step {self.step}: {name} weight '{bad}' became NaN or Inf")
        self.checkpointer.save(
            self.model,
            self.ema_model,
            self.optimizer,
            epoch=self.sampler.epoch,
            step=self.step,
            best_wer=self.best_wer,
            tokenizer_kw=self.tokenizer_kw,
            logmel_norm_weight=self.norm_weight(),
            config_path=str(self.config_path.resolve()),
            config=self.cfg,
            asset_sha256=self.asset_sha256,
            dev_wer=dev_wer,
            rng_state=get_rng_state(),
            data_state=self.sampler.state_dict(),
            grad_scaler=self.scaler.state_dict() if self.amp else None,
            **kind,
        )

    def validate(self) -> float:
        start = time.perf_counter()
        wer, words = self.validator(self.ema_model)
        self.last_wer = wer
        improved = wer < self.best_wer and self.norm_weight() == 1.0
        self.log.info(
            f"step {self.step}: dev WER {100 * wer:.2f}% of {words} words (EMA model, "
            f"{self.validator.decoder.description})"
            + (f"; best so far, saving {self.checkpointer.best_path.name}" if improved else "")
        )
        self.log.scalars(self.step, {"dev/wer": wer})
        if improved:
            self.best_wer = wer
            self.save(wer, is_best=True)
        self.throughput.pause(time.perf_counter() - start)
        return wer

    def features(
        self, batch: Batch, norm_weight: float, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder input of a training batch: from its audio, or from its cached log-mels (``--feature_cache``)."""
        if batch.logmel is not None:
            return self.train_pipeline.from_logmel(
                batch.logmel, batch.logmel_lens, norm_weight=norm_weight, generator=generator
            )
        return self.train_pipeline(
            batch.audio, batch.audio_lens, norm_weight=norm_weight, generator=generator
        )

    def train_step(self, batches: TrainBatches) -> tuple[float, float, float]:
        """One optimizer step over ``grad_accumulation_batches`` micro-batches.

        Returns (mean loss, gradient norm before clipping, audio seconds on this process).
        """
        args, step = self.args, self.step + 1
        accumulate = args.grad_accumulation_batches
        weight = self.norm_weight()
        total_loss, audio_secs = 0.0, 0.0
        for micro in range(accumulate):
            batch = next(batches).to(self.device, non_blocking=True)
            self.sampler.advance()
            audio_secs += float(batch.audio_lens.sum()) / self.sample_rate
            features_gen = generator(
                derive_seed(args.seed, Purpose.FEATURES, step, self.dist.rank, micro), self.device
            )
            x, x_lens = self.features(batch, weight, features_gen)
            torch.manual_seed(derive_seed(args.seed, Purpose.DROPOUT, step, self.dist.rank, micro))
            sync = self.dist.distributed and micro < accumulate - 1
            with self.loss_module.no_sync() if sync else contextlib.nullcontext():
                with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
                    loss = self.loss_module(x, x_lens, batch.tokens, batch.token_lens)
                self.scaler.scale(loss / accumulate).backward()
            total_loss += float(loss.detach())
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(params, args.clip_norm if args.clip_norm > 0 else math.inf)
        )
        std = grad_noise_std(step, *self.grad_noise)
        if std > 0:
            noise_gen = generator(derive_seed(args.seed, Purpose.GRAD_NOISE, step), self.device)
            for p in params:
                p.grad.add_(
                    torch.randn(p.grad.shape, generator=noise_gen, device=p.device, dtype=p.grad.dtype),
                    alpha=std,
                )
        lr = learning_rate(
            step, args.lr, args.min_lr, args.warmup_steps, args.hold_steps, args.half_life_steps
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_factor"]
        if self.amp or math.isfinite(grad_norm):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.log.info(f"step {step}: non-finite gradient norm, update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema_model, self.model, args.ema)
        self.step = step
        return total_loss / accumulate, grad_norm, audio_secs

    def run(self) -> int:
        args = self.args
        if self.step >= args.training_steps:
            self.log.info(
                f"already at step {self.step} >= --training_steps {args.training_steps}; nothing to train"
            )
        self.model.train()
        batches = TrainBatches(
            self.train_items, self.sampler, self.sampler.consumed, args.seed, self.dist.rank, args.num_workers
        )
        with PreemptionHandler(notify=self.log.error) as preemption, batches:
            try:
                stop_signal = self._train_until_done_or_stopped(batches, preemption)
            except TrainingDiverged as exc:
                self.log.error(
                    f"error: {exc}; training stopped and the checkpoints already saved are intact "
                    "(resume from one of them with a lower --lr, or fine-tune from it)"
                )
                self.log.close()
                return 1
            reason = "finished" if stop_signal is None else f"signal {stop_signal}"
            status = run_finalize(self.finalize_callbacks(), self._finalize_context(reason))
        if status == 0 and stop_signal is None:
            self.log.info(f"validate the best hardware checkpoint with:\n  {self.val_command()}")
        elif status == 0:
            self.log.info("continue this run with --resume (and the same other arguments)")
        self.log.close()
        if status:
            return status
        return 0 if stop_signal is None else 128 + stop_signal

    def _train_until_done_or_stopped(
        self, batches: TrainBatches, preemption: PreemptionHandler
    ) -> Optional[int]:
        """Train to ``--training_steps`` or a stop request, then save the last checkpoint.

        Returns the signal number that stopped training, or None when it finished.

        Raises:
            TrainingDiverged: the loss or the weights became non-finite (nothing more is saved).
        """
        args = self.args
        last_val_step = -1
        stop_signal: Optional[int] = None
        loss_sum, loss_count = 0.0, 0
        while self.step < args.training_steps:
            loss, grad_norm, audio_secs = self.train_step(batches)
            if dist_utils.any_rank(not math.isfinite(loss), self.dist, self.device):
                raise TrainingDiverged(f"step {self.step}: the training loss became NaN or Inf")
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
            self.throughput.add_audio(audio_secs * self.dist.world_size)
            if self.step % args.log_frequency == 0 or self.step == args.training_steps:
                self._log_progress(loss_sum / loss_count, grad_norm)
                loss_sum, loss_count = 0.0, 0
            dev_wer = None
            if (
                self.step == 1
                or (args.val_frequency and self.step % args.val_frequency == 0)
                or self.step == args.training_steps
            ):
                dev_wer = self.validate()
                last_val_step = self.step
            if args.save_frequency and self.step % args.save_frequency == 0:
                start = time.perf_counter()
                self.save(dev_wer)
                self.throughput.pause(time.perf_counter() - start)
            if dist_utils.any_rank(preemption.stop_requested, self.dist, self.device):
                stop_signal = preemption.signum or 15
                self.log.info(f"stopping at step {self.step} on request")
                break
        batches.close()
        self.save(self.last_wer if last_val_step == self.step else None, is_last=True)
        self.log.info(f"saved {self.checkpointer.last_path}")
        return stop_signal

    def val_command(self) -> str:
        """The ./val.sh command that scores the best hardware checkpoint on this run's dev data."""
        script = shown_path(REPO_ROOT / "val.sh")
        parts = [
            script if "/" in script else f"./{script}",
            "--ckpt",
            shown_path(hw_path(self.checkpointer.best_path)),
        ]
        if Path(self.args.dataset_dir).resolve() != (
            REPO_ROOT / REPO_DEFAULTS["dataset_dir"]
        ).resolve() or self.args.val_manifests != ["dev.json"]:
            parts += [
                "--dataset_dir",
                shown_path(self.args.dataset_dir),
                "--val_manifests",
                *map(shlex.quote, self.args.val_manifests),
            ]
        return " ".join(parts)

    def finalize_callbacks(self) -> list[FinalizeCallback]:
        """The hardware export, then the inference conversion of ``--export_servers`` (which reads its files)."""
        hardware = HardwareExportCallback(
            skip_ngram=self.args.skip_ngram, skip_state_dict_check=self.args.skip_state_dict_check
        )
        return [hardware] + ([self.conversion] if self.conversion else [])

    def _finalize_context(self, reason: str) -> FinalizeContext:
        return FinalizeContext(
            best_path=self.checkpointer.best_path,
            last_path=self.checkpointer.last_path,
            config_path=self.config_path,
            dist=self.dist,
            reason=reason,
            config=self.cfg,
            log=self.log.info,
            log_error=self.log.error,
        )

    def _log_progress(self, loss: float, grad_norm: float) -> None:
        if self.dist.distributed:
            loss = dist_utils.all_sum([loss], self.dist, self.device)[0] / self.dist.world_size
        rates = self.throughput.report(self.step)
        lr = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0]["lr_factor"]
        weight = self.norm_weight()
        self.log.info(
            f"step {self.step}/{self.args.training_steps} epoch {self.sampler.epoch} loss {loss:.3f} "
            f"lr {lr:.2e} grad_norm {grad_norm:.2f} | {rates['steps_per_sec']:.2f} steps/s "
            f"{rates['audio_sec_per_sec']:.1f} audio s/s | ETA {format_seconds(rates['eta_sec']) if math.isfinite(rates['eta_sec']) else '?'}"
        )
        self.log.scalars(
            self.step,
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/steps_per_sec": rates["steps_per_sec"],
                "train/audio_sec_per_sec": rates["audio_sec_per_sec"],
                "train/logmel_norm_weight": weight,
            },
        )


def cli() -> None:
    """Console-script entry point (``caiman-train``)."""
    run_cli(main)


if __name__ == "__main__":
    run_cli(main)
