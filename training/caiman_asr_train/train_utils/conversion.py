"""Conversion when training ends: the inference artefacts a run is configured for.

``train.py --export_servers onnxruntime,sherpa-onnx [--export_quantize_type T] [--export_verify]``
adds a ``ConversionCallback`` after the hardware export. On rank 0 it runs the
batch converter (``caiman_asr_train.export.convert``, the ``caiman-convert``
command) on the run's best hardware checkpoint (the last one when no
validation improved), writing

    <export_dir>/<run directory name>/<best|last>/<server>[-<quantize_type>]/...  + manifest.json

(``--export_dir`` defaults to ``<output_dir>/inference``). A failure prints
why and the exact ``caiman-convert`` command that redoes it, keeps every
checkpoint, and raises ``ExportFailed`` so that training exits non-zero;
other ranks return at once and meet rank 0 at ``run_finalize``'s barrier.
"""

import argparse
import shlex
import traceback
from pathlib import Path
from typing import Optional, Union

from caiman_asr_train.core.errors import UserError
from caiman_asr_train.export import convert
from caiman_asr_train.export.checkpointer import read_checkpoint, recorded_config
from caiman_asr_train.export.hardware_ckpt import hw_path
from caiman_asr_train.train_utils.callbacks import ExportFailed, FinalizeContext, shown_path

__all__ = ["EXPORT_SERVERS", "ConversionCallback", "add_export_args"]

# The hardware export already writes the FPGA server's file next to the checkpoints.
EXPORT_SERVERS = tuple(server for server in convert.SERVERS if server != "myrtle-fpga")
DEFAULT_EXPORT_SUBDIR = "inference"

Arg = Union[str, Path]


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--export_servers``, ``--export_quantize_type``, ``--export_verify`` and ``--export_dir``."""
    group = parser.add_argument_group("inference export when training ends")
    group.add_argument(
        "--export_servers",
        nargs="+",
        default=None,
        help=f"also convert the best hardware checkpoint for these servers, space- or comma-separated: "
        f"{', '.join(EXPORT_SERVERS)} (default: none)",
    )
    group.add_argument(
        "--export_quantize_type",
        default=None,
        help="quantize the exported weights: int8_per_channel, int8_blockwise, int4_per_channel or int4_blockwise",
    )
    group.add_argument(
        "--export_verify",
        action="store_true",
        help="decode the --val_manifests with each artefact and with its source, failing the export when "
        "a quantized artefact's WER is worse by more than 1 percentage point",
    )
    group.add_argument(
        "--export_dir",
        default=None,
        help=f"where the inference artefacts go (default: <output_dir>/{DEFAULT_EXPORT_SUBDIR})",
    )


class ConversionCallback:
    """Finalize callback: convert the run's best (else last) checkpoint for the configured servers.

    Args:
        servers: target servers (names of ``EXPORT_SERVERS``).
        output_dir: the training run's ``--output_dir``.
        export_dir: the converter's ``--output_directory`` (default ``<output_dir>/inference``).
        quantize_type: weight quantization type, or None for float32 weights.
        verify_manifests: manifest paths to decode with each artefact, or None.
        dataset_dir: the directory those manifests' audio paths are relative to.

    Raises:
        UserError: when constructed with arguments the converter refuses, so
            that training stops before it starts rather than at the end.
    """

    def __init__(
        self,
        servers: list[str],
        output_dir: Path,
        export_dir: Optional[Path] = None,
        quantize_type: Optional[str] = None,
        verify_manifests: Optional[list[Path]] = None,
        dataset_dir: Optional[Path] = None,
    ) -> None:
        self.servers = [name for part in servers for name in part.split(",") if name]
        self.output_dir = Path(output_dir)
        self.export_dir = Path(export_dir) if export_dir else self.output_dir / DEFAULT_EXPORT_SUBDIR
        self.quantize_type = quantize_type
        self.verify_manifests = verify_manifests
        self.dataset_dir = dataset_dir
        fpga = [
            server for server in self.servers if server not in EXPORT_SERVERS and server in convert.SERVERS
        ]
        if fpga:
            raise UserError(
                f"--export_servers {', '.join(fpga)}: the hardware checkpoints are always written; "
                f"choose from {', '.join(EXPORT_SERVERS)}"
            )
        try:
            convert.parse_args(
                [str(a) for a in self.argv(self.output_dir / "checkpoint.hw.pt", "best", None)]
            )
        except UserError as exc:
            raise UserError(f"--export_servers/--export_quantize_type: {exc}") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Optional["ConversionCallback"]:
        """The callback ``add_export_args``'s flags ask for, or None without ``--export_servers``."""
        if not args.export_servers:
            return None
        return cls(
            servers=args.export_servers,
            output_dir=Path(args.output_dir),
            export_dir=Path(args.export_dir) if args.export_dir else None,
            quantize_type=args.export_quantize_type,
            verify_manifests=[Path(args.dataset_dir) / m for m in args.val_manifests]
            if args.export_verify
            else None,
            dataset_dir=Path(args.dataset_dir) if args.export_verify else None,
        )

    def argv(self, source: Path, label: str, config: Optional[Path]) -> list[Arg]:
        """The converter's arguments for ``source`` (paths stay ``Path`` so ``command`` can show them)."""
        argv: list[Arg] = ["--ckpt", source, "--inference_server", ",".join(self.servers)]
        argv += [
            "--output_directory",
            self.export_dir,
            "--model_name",
            self.output_dir.name,
            "--version",
            label,
        ]
        if config is not None:
            argv += ["--config", config]
        if self.quantize_type:
            argv += ["--quantize_type", self.quantize_type]
        if self.verify_manifests:
            argv += ["--verify_manifests", *self.verify_manifests, "--dataset_dir", self.dataset_dir]
        return argv

    @staticmethod
    def command(argv: list[Arg]) -> str:
        """The shell command that runs the converter with ``argv``."""
        return " ".join(
            ["caiman-convert"] + [shown_path(a) if isinstance(a, Path) else shlex.quote(a) for a in argv]
        )

    def source(self, ctx: FinalizeContext) -> tuple[Path, str, Optional[Path]]:
        """``(checkpoint, label, config)``: the best hardware checkpoint, else the last; failing those
        (the hardware export failed) the training checkpoint, with the run's YAML when it records no config."""
        for label, ckpt in (("best", ctx.best_path), ("last", ctx.last_path)):
            if hw_path(ckpt).is_file():
                return hw_path(ckpt), label, None
        for label, ckpt in (("best", ctx.best_path), ("last", ctx.last_path)):
            if ckpt.is_file():
                recorded = recorded_config(read_checkpoint(ckpt, mmap=True)) is not None
                return ckpt, label, None if recorded else ctx.config_path
        raise UserError(f"no best or last checkpoint in {self.output_dir} to convert")

    def __call__(self, ctx: FinalizeContext) -> None:
        if not ctx.dist.is_main:
            return
        argv: list[Arg] = []
        try:
            argv = self.argv(*self.source(ctx))
            records = convert.convert(convert.parse_args([str(a) for a in argv]))
        except Exception as exc:  # noqa: BLE001 - report every failure as one export failure
            reason = (
                str(exc)
                if isinstance(exc, UserError)
                else "".join(traceback.format_exception_only(exc)).strip()
            )
            redo = f"  {self.command(argv)}" if argv else "  (no checkpoint to convert)"
            ctx.log_error(
                f"error: conversion for {', '.join(self.servers)} failed: {reason}\n"
                f"  the training checkpoints are intact; fix the cause and rerun:\n{redo}"
            )
            raise ExportFailed(f"conversion for {', '.join(self.servers)} failed") from None
        for record in records:
            ctx.log(f"{record['server']} artefacts {record['status']}: {shown_path(record['target'])}")
