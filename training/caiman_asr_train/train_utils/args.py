"""The command line of ``caiman_asr_train.train``: every flag, its default and its checks.

Unset paths default to the demo's, in the repository; ``--help`` shows the
values the other arguments on the command line give (``./train.sh --help``
passes the demo's schedule first, so it shows what the demo will use).
"""

import argparse
from typing import Sequence

from caiman_asr_train.core.errors import UserError
from caiman_asr_train.evaluate.decoding import add_decoder_args, check_decoder_args
from caiman_asr_train.train_utils.conversion import add_export_args
from caiman_asr_train.train_utils.optim import OPTIMIZERS
from caiman_asr_train.utils.paths import REPO_ROOT

HELP_FLAGS = ("-h", "--help")

REPO_DEFAULTS = {
    "model_config": "training/configs/demo.yaml",
    "output_dir": "results",
    "dataset_dir": "datasets/demo",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # Unset defaults (None) are explained in the help text itself.
    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line.

    Paths default to the built-in demo's; the schedule defaults suit full-size
    GPU runs (upstream-like LAMB at batch 1024, EMA 0.999). ``./train.sh``
    passes the demo's short CPU schedule (``DEMO_ARGS`` there).
    """
    p = argparse.ArgumentParser(
        description="Train an RNN-T and export hardware checkpoints when training ends.",
        formatter_class=_HelpFormatter,
        # --skip_ngram of the decoding flags is redefined below for the export as well.
        conflict_handler="resolve",
    )
    io = p.add_argument_group("data and files")
    io.add_argument(
        "--model_config",
        default=None,
        help=f"YAML model config (default: {REPO_DEFAULTS['model_config']} in the repository)",
    )
    io.add_argument(
        "--output_dir",
        default=None,
        help=f"where checkpoints, logs and TensorBoard files go (default: {REPO_DEFAULTS['output_dir']} in the repository)",
    )
    io.add_argument(
        "--dataset_dir",
        default=None,
        help=f"directory manifests and their audio paths are relative to (default: {REPO_DEFAULTS['dataset_dir']} in the repository)",
    )
    io.add_argument(
        "--train_manifests",
        nargs="+",
        default=["train.json"],
        help="training manifests (relative to --dataset_dir)",
    )
    io.add_argument(
        "--feature_cache",
        default=None,
        metavar="DIR",
        help="read the training utterances' log-mels from DIR (made once by python -m "
        "caiman_asr_train.data.feature_cache) instead of decoding and featurising their audio every "
        "step; its dither is drawn once per utterance; not with speed perturbation",
    )
    io.add_argument(
        "--val_manifests",
        nargs="+",
        default=["dev.json"],
        help="validation manifests (relative to --dataset_dir)",
    )

    sched = p.add_argument_group("schedule and optimizer")
    sched.add_argument(
        "--training_steps",
        type=int,
        default=50000,
        help="optimizer steps to train for (in total, across resumes)",
    )
    sched.add_argument(
        "--global_batch_size",
        type=int,
        default=1024,
        help="utterances per optimizer step, over all processes and micro-batches",
    )
    sched.add_argument(
        "--grad_accumulation_batches",
        type=int,
        default=1,
        help="micro-batches per optimizer step (each global_batch_size / this / processes utterances per process)",
    )
    sched.add_argument("--lr", type=float, default=4e-3, help="peak learning rate")
    sched.add_argument("--min_lr", type=float, default=4e-5, help="floor of the exponential decay")
    sched.add_argument("--warmup_steps", type=int, default=1500, help="linear warmup steps from 0 to --lr")
    sched.add_argument("--hold_steps", type=int, default=10000, help="steps at --lr after warmup")
    sched.add_argument(
        "--half_life_steps",
        type=float,
        default=5000,
        help="steps for the learning rate to halve after hold (0: no decay)",
    )
    sched.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="lamb",
        help="lamb (apex FusedLAMB on CUDA when installed, else the same update in plain PyTorch) or adamw; see train_utils/optim.py",
    )
    sched.add_argument(
        "--weight_decay", type=float, default=1e-3, help="decoupled weight decay (both optimizers)"
    )
    sched.add_argument(
        "--clip_norm", type=float, default=1.0, help="clip the global gradient norm to this (0: no clipping)"
    )
    sched.add_argument(
        "--ema", type=float, default=0.999, help="EMA decay d: ema = d*ema + (1-d)*model after every step"
    )
    sched.add_argument(
        "--seed", type=int, default=1, help="seeds initialisation, data order and all augmentation"
    )
    sched.add_argument(
        "--norm_ramp_start_step",
        type=int,
        default=0,
        help="step where the per-utterance to dataset normalisation ramp starts",
    )
    sched.add_argument(
        "--norm_ramp_end_step", type=int, default=0, help="step from which only dataset normalisation is used"
    )
    sched.add_argument(
        "--no_amp", action="store_true", help="train in float32 on CUDA too (AMP is never used on CPU)"
    )

    val = p.add_argument_group("validation, checkpoints and logs")
    val.add_argument(
        "--val_frequency",
        type=int,
        default=1000,
        help="validate the EMA model every N steps (also at step 1 and at the end; 0: only then)",
    )
    val.add_argument(
        "--val_batch_size", type=int, default=64, help="utterances per validation batch (per process)"
    )
    val.add_argument(
        "--val_final_padding_secs",
        type=float,
        default=0.24,
        help="seconds of silence appended to each validation utterance, as the server does",
    )
    val.add_argument(
        "--save_frequency",
        type=int,
        default=5000,
        help="save RNN-T_step{N}_checkpoint.pt every N steps (0: never)",
    )
    val.add_argument(
        "--keep_last_n",
        type=int,
        default=None,
        help="keep only the newest N step checkpoints (best and last are always kept; default: keep all)",
    )
    val.add_argument(
        "--log_frequency", type=int, default=100, help="print and log training metrics every N steps"
    )

    run = p.add_argument_group("run control")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from --ckpt or the newest valid checkpoint in --output_dir (weights, EMA, optimizer, schedule, RNG and data position)",
    )
    run.add_argument(
        "--fine_tune",
        action="store_true",
        help="start from the weights and EMA of --ckpt with a fresh schedule and optimizer",
    )
    run.add_argument(
        "--ckpt",
        default=None,
        help="training checkpoint for --resume (default: the newest in --output_dir) or --fine_tune",
    )
    run.add_argument(
        "--skip_state_dict_check",
        action="store_true",
        help="export hardware checkpoints of models that are not FPGA variants (software use only; the demo needs it)",
    )
    run.add_argument(
        "--num_gpus",
        type=int,
        default=1,
        help="processes (one per GPU; CPU ones use gloo); >1 starts one per device as torchrun --standalone would",
    )
    run.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="training device (auto: CUDA when available)",
    )
    run.add_argument(
        "--cpu_threads",
        type=int,
        default=0,
        help="torch threads per CPU training process (0: the machine's cores / processes, less --num_workers)",
    )
    run.add_argument(
        "--num_workers",
        type=int,
        default=1,
        help="DataLoader worker processes per training process (0: load in the main process)",
    )
    run.add_argument(
        "--num_buckets", type=int, default=6, help="duration buckets for batching (1: plain shuffling)"
    )
    add_decoder_args(p)
    # One flag for both uses of the config's n-gram: beam validation and the hardware export.
    p.add_argument(
        "--skip_ngram",
        action="store_true",
        help="validate (with --decoder beam) and export hardware checkpoints without the config's n-gram",
    )
    add_export_args(p)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and check ``argv``; unset paths become the demo's, in the repository."""
    parser = build_parser()
    if any(flag in HELP_FLAGS for flag in argv):
        # Help shows the values the other arguments give, not only the built-in defaults.
        given, _ = parser.parse_known_args([arg for arg in argv if arg not in HELP_FLAGS])
        parser.set_defaults(**vars(given))
    args = parser.parse_args(argv)
    for name, relative in REPO_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, str(REPO_ROOT / relative))
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject inconsistent flags with a one-line message."""
    positive = (
        "training_steps",
        "global_batch_size",
        "grad_accumulation_batches",
        "val_batch_size",
        "log_frequency",
        "num_gpus",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in (
        "val_frequency",
        "save_frequency",
        "warmup_steps",
        "hold_steps",
        "num_workers",
        "cpu_threads",
    ):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.ema < 1.0:
        raise UserError(f"--ema must be in [0, 1), got {args.ema}")
    if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise UserError(f"need 0 <= --min_lr <= --lr and --lr > 0, got --lr {args.lr} --min_lr {args.min_lr}")
    if args.norm_ramp_end_step < args.norm_ramp_start_step:
        raise UserError("--norm_ramp_end_step must be >= --norm_ramp_start_step")
    if args.resume and args.fine_tune:
        raise UserError(
            "--resume and --fine_tune exclude each other: resume continues a run, fine_tune starts a new one"
        )
    if args.fine_tune and not args.ckpt:
        raise UserError("--fine_tune needs --ckpt (the checkpoint whose weights to start from)")
    if args.ckpt and not (args.resume or args.fine_tune):
        raise UserError("--ckpt is used only with --resume or --fine_tune; add one of them")
    check_decoder_args(args)
    if args.keep_last_n is not None and args.keep_last_n < 1:
        raise UserError(f"--keep_last_n must be >= 1, got {args.keep_last_n}")


def local_batch_size(args: argparse.Namespace, world_size: int) -> int:
    """Utterances per micro-batch per process."""
    parts = args.grad_accumulation_batches * world_size
    if args.global_batch_size % parts:
        raise UserError(
            f"--global_batch_size {args.global_batch_size} is not divisible by "
            f"--grad_accumulation_batches ({args.grad_accumulation_batches}) x processes ({world_size})"
        )
    return args.global_batch_size // parts
