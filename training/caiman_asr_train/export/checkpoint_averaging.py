"""Average the weights of several checkpoints of one run: the command line.

Averaging the best few checkpoints of a run usually lowers WER a little further
than EMA alone. From the repository root::

    # the 3 checkpoints with the lowest dev WER, inverse-WER weighted
    python -m caiman_asr_train.export.checkpoint_averaging --checkpoint_dir results \\
        --top_n 3 --output_path results/avg.pt

    # the newest 3 step checkpoints, straight into a hardware checkpoint (with the config they recorded)
    python -m caiman_asr_train.export.checkpoint_averaging --checkpoint_dir results \\
        --last_n 3 --output_hw results/avg.hw.pt --skip_state_dict_check

    # sharded checkpoints (zarr or torch DCP directories), NeMo's flags
    python -m caiman_asr_train.export.checkpoint_averaging --name_prefix megatron_gpt \\
        --checkpoint_dir nemo_run/checkpoints --steps 1000,2000

The same command averages single-file training checkpoints
(``averaging_engine``) and sharded checkpoint directories
(``sharded_averaging``); which one is decided by the inputs: ``--ckpts`` that
are directories, or a ``--checkpoint_dir`` holding checkpoint directories,
mean sharded checkpoints. Selection and weighting are the same for both
(``averaging_selection``): ``--steps`` (``1000,2000`` or ``1000 2000``),
``--top_n`` by dev WER, ``--last_n``, ``--weights``, otherwise inverse-WER.

Outputs for single files (written atomically). ``--output_path``: a training
checkpoint (docs/formats.md section 8) that records the newest input's config, like the
inputs train.py wrote. ``--output_hw``: a hardware checkpoint made from it by
``create_hardware_ckpt`` with that config (``--model_config`` for older
checkpoints that record none). ``--output_hw``
with ``--input_hw``: a copy of that hardware checkpoint with the averaged EMA
weights (and the newest input's epoch, step and best_wer) in place of its own.
For sharded checkpoints: the directory ``<checkpoint_dir>/<name_prefix>-averaged``
(or ``--output_dir``/``--output_name``).
"""

import argparse
import warnings
from pathlib import Path
from typing import Optional, Sequence

from caiman_asr_train.core.errors import HardwareCheckpointError, UserError
from caiman_asr_train.core.load_hw import read_checkpoint, validate_hw_checkpoint
from caiman_asr_train.export.averaging_engine import average_checkpoints, select_checkpoints
from caiman_asr_train.export.averaging_selection import (
    WER_EPS,
    info_from_name,
    inspect_checkpoint,
    parse_steps,
    resolve_weights,
)
from caiman_asr_train.export.checkpointer import recorded_config
from caiman_asr_train.export.hardware_ckpt import (
    create_hardware_ckpt,
    hardware_ckpt_with_weights,
    save_hardware_ckpt,
)
from caiman_asr_train.export.sharded_averaging import (
    average_sharded,
    default_output,
    select_sharded,
    sharded_format,
)
from caiman_asr_train.rnnt import config
from caiman_asr_train.utils.atomic import atomic_torch_save
from caiman_asr_train.utils.cli import run_cli


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Average training checkpoints (files, or sharded zarr/DCP directories) into one checkpoint.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--ckpts",
        nargs="+",
        metavar="CKPT",
        help="training checkpoints (files, or sharded checkpoint directories)",
    )
    source.add_argument(
        "--checkpoint_dir",
        help="directory of a run's checkpoints (train.py --output_dir, or NeMo's checkpoints directory); "
        "choose with --top_n, --last_n or --steps (sharded directories: default every checkpoint)",
    )
    parser.add_argument(
        "--name_prefix",
        help="sharded checkpoints: only directories whose name starts with this; the output is "
        "<checkpoint_dir>/<name_prefix>-averaged",
    )
    parser.add_argument(
        "--top_n", type=int, help="with --checkpoint_dir: the N checkpoints with the lowest dev WER"
    )
    parser.add_argument("--last_n", type=int, help="with --checkpoint_dir: the N newest step checkpoints")
    parser.add_argument(
        "--steps",
        nargs="+",
        metavar="STEP",
        help="with --checkpoint_dir: the checkpoints of these steps, as 1000,2000 or 1000 2000",
    )
    parser.add_argument(
        "--weights",
        type=float,
        nargs="+",
        metavar="W",
        help="one weight per checkpoint, in the order they are listed (--top_n: best first; --last_n, --steps: "
        "oldest first); normalised to sum 1",
    )
    parser.add_argument(
        "--equal_weights",
        action="store_true",
        help="equal weights even when every checkpoint records a dev WER",
    )
    parser.add_argument(
        "--wer_eps",
        type=float,
        default=WER_EPS,
        help=f"inverse-WER weights are 1/(WER + this), WER a fraction (default {WER_EPS})",
    )
    parser.add_argument(
        "--output_path", help="write the averaged training checkpoint here (e.g. results/avg.pt)"
    )
    parser.add_argument(
        "--output_dir",
        help="sharded checkpoints: directory to write the averaged checkpoint in (default: --checkpoint_dir)",
    )
    parser.add_argument(
        "--output_name",
        help="sharded checkpoints: name of the averaged checkpoint directory (default: <name_prefix>-averaged)",
    )
    parser.add_argument(
        "--keep_optimizer",
        action="store_true",
        help="sharded checkpoints: copy the most-weighted input's optimizer state (it does not match the averaged "
        "weights) instead of dropping it",
    )
    parser.add_argument(
        "--output_hw",
        help="write an averaged hardware checkpoint here, built with the config the newest input recorded "
        "(or --model_config), or copied from --input_hw",
    )
    parser.add_argument(
        "--model_config",
        help="with --output_hw: YAML config to build the hardware checkpoint from (default: the config the "
        "newest input recorded; older checkpoints record none)",
    )
    parser.add_argument(
        "--input_hw",
        help="with --output_hw: hardware checkpoint to copy, with the averaged EMA weights in place of its own",
    )
    parser.add_argument("--skip_ngram", action="store_true", help="with --output_hw (built): embed no n-gram")
    parser.add_argument(
        "--override_ngram_path",
        help="with --output_hw (built): KenLM binary to embed instead of the config's ngram_path",
    )
    parser.add_argument(
        "--skip_state_dict_check",
        action="store_true",
        help="with --output_hw (built): accept weights matching no FPGA variant (software-only hardware checkpoint)",
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="print the selection and weights, write nothing"
    )
    args = parser.parse_args(argv)
    args.steps = parse_steps(args.steps)
    return args


def _sharded(args: argparse.Namespace) -> bool:
    """Whether the inputs are sharded checkpoint directories rather than files."""
    if args.ckpts:
        return all(Path(p).is_dir() for p in args.ckpts)
    directory = Path(args.checkpoint_dir)
    return directory.is_dir() and any(p.is_dir() and sharded_format(p) for p in directory.iterdir())


def _check_args(args: argparse.Namespace, sharded: bool) -> None:
    picks = [name for name in ("top_n", "last_n", "steps") if getattr(args, name) is not None]
    if args.checkpoint_dir is None and picks:
        raise UserError(f"--{picks[0]} needs --checkpoint_dir")
    if sharded:
        single = [f for f in ("output_path", "output_hw", "model_config", "input_hw") if getattr(args, f)]
        if single:
            raise UserError(
                f"--{single[0]} is for single-file checkpoints; sharded ones are written to --output_dir/--output_name"
            )
        if len(picks) > 1:
            raise UserError("give at most one of --top_n, --last_n and --steps")
        if args.ckpts and not args.output_name and not args.output_dir and not args.name_prefix:
            raise UserError(
                "with --ckpts directories, give --output_dir and --output_name for the averaged checkpoint"
            )
        return
    sharded_flags = [
        f for f in ("name_prefix", "output_dir", "output_name", "keep_optimizer") if getattr(args, f)
    ]
    if sharded_flags:
        raise UserError(
            f"--{sharded_flags[0]} is for sharded checkpoint directories; none found among the inputs"
        )
    if args.checkpoint_dir is not None and len(picks) != 1:
        raise UserError("--checkpoint_dir needs exactly one of --top_n, --last_n and --steps")
    if not args.dry_run and not (args.output_path or args.output_hw):
        raise UserError("nothing to write; give --output_path and/or --output_hw (or --dry_run)")
    if args.model_config and args.input_hw:
        raise UserError("--model_config (build) and --input_hw (copy) exclude each other; pass at most one")
    if not args.output_hw and (args.model_config or args.input_hw):
        raise UserError("--model_config and --input_hw only apply with --output_hw")
    hw_flags = [f for f in ("skip_ngram", "override_ngram_path", "skip_state_dict_check") if getattr(args, f)]
    if hw_flags and (args.input_hw or not args.output_hw):
        raise UserError(f"--{hw_flags[0]} only applies with --output_hw without --input_hw")
    if (
        args.output_hw
        and args.output_path
        and Path(args.output_hw).resolve() == Path(args.output_path).resolve()
    ):
        raise UserError("--output_path and --output_hw are the same file; give two paths")


def _dry_run(infos: list, args: argparse.Namespace) -> None:
    weights, weighting = resolve_weights(
        [i.wer for i in infos], args.weights, equal=args.equal_weights, wer_eps=args.wer_eps
    )
    print(f"dry run: would average with {weighting} weights:")
    for info, weight in zip(infos, weights):
        print(f"  weight {weight:.4f}  {info.path} {info.summary()}")


def _main_sharded(args: argparse.Namespace) -> None:
    if args.checkpoint_dir is not None:
        infos = select_sharded(
            args.checkpoint_dir,
            name_prefix=args.name_prefix,
            top_n=args.top_n,
            last_n=args.last_n,
            steps=args.steps,
        )
        output = default_output(args.checkpoint_dir, args.name_prefix, args.output_dir, args.output_name)
    else:
        infos = [info_from_name(p) for p in args.ckpts]
        output = default_output(
            Path(args.ckpts[0]).parent, args.name_prefix, args.output_dir, args.output_name
        )
    if args.dry_run:
        _dry_run(infos, args)
        print(f"  output would be {output}")
        return
    record = average_sharded(
        [i.path for i in infos],
        output,
        args.weights,
        infos=infos,
        equal_weights=args.equal_weights,
        wer_eps=args.wer_eps,
        keep_optimizer=args.keep_optimizer,
    )
    print(f"wrote {output}: averaged {record['format']} checkpoint of {len(infos)} input(s)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    sharded = _sharded(args)
    _check_args(args, sharded)
    if sharded:
        _main_sharded(args)
        return
    if args.checkpoint_dir is not None:
        chosen = select_checkpoints(
            args.checkpoint_dir, top_n=args.top_n, last_n=args.last_n, steps=args.steps
        )
        paths = [c.path for c in chosen]
    else:
        paths = [Path(p) for p in args.ckpts]
    for output in (args.output_path, args.output_hw):
        if output and any(Path(output).resolve() == p.resolve() for p in paths):
            raise UserError(f"output {output} is one of the inputs; write the average to a new file")
    if args.dry_run:
        _dry_run([inspect_checkpoint(p, read_checkpoint(p, mmap=True)) for p in paths], args)
        return
    # Fail on a bad config or hardware checkpoint before the averaging, not after it.
    cfg = config.load(args.model_config) if args.model_config else None
    if args.output_hw and not (cfg or args.input_hw):
        for path in paths:
            if recorded_config(read_checkpoint(path, mmap=True)) is None:
                raise UserError(
                    f"{path} records no config (saved before checkpoints carried one); pass --model_config "
                    "with --output_hw"
                )
    input_hw = None
    if args.input_hw:
        input_hw = read_checkpoint(args.input_hw, mmap=True)
        validate_hw_checkpoint(input_hw, f"--input_hw {args.input_hw}")

    averaged = average_checkpoints(
        paths, args.weights, equal_weights=args.equal_weights, wer_eps=args.wer_eps, progress=True
    )
    if args.output_path:
        atomic_torch_save(averaged, args.output_path)
        print(f"wrote {args.output_path}: averaged training checkpoint (step {averaged['step']})")
    if args.output_hw:
        if input_hw is not None:
            hw = _with_averaged_weights(input_hw, averaged, args.input_hw)
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hw = create_hardware_ckpt(
                    averaged,
                    cfg,
                    skip_ngram=args.skip_ngram,
                    override_ngram_path=args.override_ngram_path,
                    skip_state_dict_check=args.skip_state_dict_check,
                )
            for warning in caught:
                print(f"warning: {warning.message}")
        save_hardware_ckpt(hw, args.output_hw)
        print(f"wrote {args.output_hw}: hardware checkpoint with the averaged EMA weights")


def _with_averaged_weights(hw: dict, averaged: dict, source: str) -> dict:
    """``hw`` with the averaged EMA weights and the newest input's epoch, step and best_wer."""
    weight = averaged["logmel_norm_weight"]
    if weight != 1.0:
        raise HardwareCheckpointError(
            f"the averaged checkpoints have logmel_norm_weight {weight}, not 1.0 (the normalisation ramp had "
            "not finished); average checkpoints saved after --norm_ramp_end_step"
        )
    try:
        return hardware_ckpt_with_weights(
            hw,
            averaged["ema_state_dict"],
            epoch=int(averaged["epoch"]),
            step=int(averaged["step"]),
            best_wer=float(averaged["best_wer"]),
        )
    except HardwareCheckpointError as exc:
        raise HardwareCheckpointError(f"--input_hw {source}: {exc}") from None


if __name__ == "__main__":
    run_cli(main)
