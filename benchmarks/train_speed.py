"""Training throughput of train.py's optimizer step on the demo config (or any train.py flags).

Usage (from the repository root, after scripts/prepare_demo.sh):

    .venv/bin/python benchmarks/train_speed.py                      # demo defaults
    .venv/bin/python benchmarks/train_speed.py --steps 20 -- --global_batch_size 16 --cpu_threads 1

Builds the same Trainer as ``train.py`` (arguments after ``--`` go to it), runs
``--warmup`` untimed steps, then times ``--steps`` optimizer steps (data
loading, features, forward, backward, clipping, LAMB and EMA; no validation or
checkpoints) and prints steps per second and audio seconds per second, plus
the time the default schedule's training steps would take at that speed.
"""

import argparse
import sys
import tempfile
import time

import torch

from caiman_asr_train import train
from caiman_asr_train.train_utils.distributed import DistInfo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, thread pools)")
    parser.add_argument("train_args", nargs="*", help="train.py arguments (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        argv = [*args.train_args, "--output_dir", output_dir]
        train_args = train.parse_args(argv)
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
        trainer.log.close()
    steps_per_sec = args.steps / elapsed
    print(
        f"{steps_per_sec:.3f} steps/s, {audio / elapsed:.1f} audio s/s "
        f"(batch {train_args.global_batch_size}, {torch.get_num_threads()} threads, "
        f"{cpu / elapsed:.2f} CPU s per s in the main process)"
    )
    print(
        f"{train_args.training_steps} steps would take {train_args.training_steps / steps_per_sec / 60:.1f} min of training steps"
    )


if __name__ == "__main__":
    sys.exit(main())
