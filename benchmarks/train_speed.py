"""Where a training step's time goes, on the demo config (or any train.py flags).

Usage (from the repository root, after scripts/prepare_demo.sh):

    .venv/bin/python benchmarks/train_speed.py                      # demo defaults
    .venv/bin/python benchmarks/train_speed.py --steps 20 -- --global_batch_size 16 --cpu_threads 1

Builds the same Trainer as ``train.py`` (arguments after ``--`` go to it) and
runs ``--warmup`` untimed steps. Then, in one run:

1. ``--steps`` whole steps through ``Trainer.train_step`` (the loop train.py
   runs), for steps per second and audio seconds per second;
2. ``--steps`` more steps made of the same parts, each part timed on its own:
   waiting for the DataLoader (audio reading, speed perturbation, padding;
   with ``--feature_cache``, reading the cached log-mels), features
   (filterbank, unless cached; normalisation, augmentation, splicing), encoder,
   predictor and joint forward, the transducer loss, backward, the optimizer
   (clipping and the update) and the EMA update;
3. one validation pass of the EMA model (``Trainer.validate``'s work), shown
   as its cost per training step at the run's ``--val_frequency``.

It prints each part's share of a step and the time the schedule's steps and
validations would take. A single process, as ``./train.sh`` trains the demo
on a CPU from the log-mel cache (``-- --feature_cache datasets/demo/features
--num_workers 0``: a torch thread per core, no loader worker). Featurising
the audio, ``./train.sh`` starts one process per core (``--num_gpus 2``), each
with one core: compare that with ``-- --cpu_threads 1``.
"""

import argparse
import math
import sys
import tempfile
import time
from collections import defaultdict
from typing import Callable, TypeVar

import torch

from caiman_asr_train import train
from caiman_asr_train.rnnt.loss import rnnt_loss
from caiman_asr_train.train_utils.distributed import DistInfo
from caiman_asr_train.train_utils.ema import update_ema

T = TypeVar("T")


def _timed(times: dict[str, float], part: str, fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = fn()
    times[part] += time.perf_counter() - start
    return result


def step_in_parts(trainer: "train.Trainer", batches: "train.TrainBatches", times: dict[str, float]) -> None:
    """One optimizer step of one micro-batch, as ``Trainer.train_step`` makes it, adding seconds per part to ``times``."""
    model, args = trainer.model, trainer.args
    batch = _timed(times, "data", lambda: next(batches).to(trainer.device))
    trainer.sampler.advance()
    x, x_lens = _timed(
        times,
        "features",
        lambda: trainer.features(batch, trainer.norm_weight()),
    )
    f, f_lens, _ = _timed(times, "encoder", lambda: model.encode(x, x_lens))
    g, _ = _timed(times, "predictor", lambda: model.predict(batch.tokens))
    logits = _timed(times, "joint", lambda: model.joint(f, g))
    loss = _timed(
        times,
        "loss",
        lambda: rnnt_loss(
            logits, f_lens, batch.tokens, batch.token_lens, blank_idx=model.config.blank_idx, reduction="mean"
        ),
    )
    _timed(times, "backward", loss.backward)

    def optimize() -> None:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, args.clip_norm if args.clip_norm > 0 else math.inf)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    _timed(times, "optimizer", optimize)
    _timed(times, "ema", lambda: update_ema(trainer.ema_model, model, args.ema))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=10, help="timed optimizer steps, for each of the two timings"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, thread pools)")
    parser.add_argument(
        "--skip_validation", action="store_true", help="do not time a validation pass (a large dev set)"
    )
    parser.add_argument("train_args", nargs="*", help="train.py arguments (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        argv = [*args.train_args, "--output_dir", output_dir]
        train_args = train.parse_args(argv)
        if train_args.grad_accumulation_batches != 1:
            parser.error(
                "the per-part timing covers one micro-batch per step; drop --grad_accumulation_batches"
            )
        trainer = train.Trainer(train_args, argv, DistInfo())
        trainer.model.train()
        with train.TrainBatches(
            trainer.train_items, trainer.sampler, 0, train_args.seed, 0, train_args.num_workers
        ) as batches:
            for _ in range(args.warmup):
                trainer.train_step(batches)
            audio = 0.0
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                audio += trainer.train_step(batches)[2]
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            times: dict[str, float] = defaultdict(float)
            for _ in range(args.steps):
                step_in_parts(trainer, batches, times)
        val_secs = None
        if not args.skip_validation:
            start = time.perf_counter()
            trainer.validator(trainer.ema_model)
            val_secs = time.perf_counter() - start
        trainer.log.close()

    step_secs = elapsed / args.steps
    print(
        f"{1 / step_secs:.3f} steps/s, {audio / elapsed:.1f} audio s/s "
        f"(batch {train_args.global_batch_size}, {torch.get_num_threads()} threads, "
        f"{cpu / elapsed:.2f} CPU s per s in the main process)"
    )
    parts_total = sum(times.values())
    print(f"share of a step (parts timed separately: {parts_total / args.steps * 1000:.0f} ms a step):")
    for part, secs in times.items():
        print(f"  {part:<10} {100 * secs / parts_total:5.1f}%  {secs / args.steps * 1000:7.1f} ms")
    train_secs = train_args.training_steps * step_secs
    line = f"{train_args.training_steps} steps would take {train_secs / 60:.1f} min of training steps"
    if val_secs is not None:
        validations = 2 + (
            (train_args.training_steps - 1) // train_args.val_frequency if train_args.val_frequency else 0
        )
        print(
            f"validation pass: {val_secs:.1f} s = {val_secs / step_secs:.0f} steps' time; "
            f"{validations} of them (step 1, every {train_args.val_frequency}, the end) add "
            f"{100 * validations * val_secs / train_secs:.0f}% to the training steps"
        )
        line += f", {(train_secs + validations * val_secs) / 60:.1f} min with validation"
    print(line)


if __name__ == "__main__":
    sys.exit(main())
