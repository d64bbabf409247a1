"""Real-time factor of the torch-free ONNX Runtime recogniser against PyTorch greedy decoding, in one run.

Usage (from the repository root, after training the demo and exporting its hardware checkpoint):

    .venv/bin/python benchmarks/runtime_speed.py --ckpt results/RNN-T_best_checkpoint.hw.pt
    .venv/bin/python benchmarks/runtime_speed.py --ckpt CKPT --bundle_dir exports/demo-onnxruntime --threads 2

The dev-set audio (``--val_manifests``, default datasets/demo/dev.json) is
read into memory first, so only featurisation and decoding are timed. Three
ways of decoding it, each with ``--threads`` CPU threads, alternating over
``--repeats`` rounds (median reported):

- pytorch: val.py's path (``FeaturePipeline`` + ``core.decoder.greedy_decode``,
  batches of ``--batch_size`` utterances, final padding 0.24 s, no dither);
- onnxruntime: ``Recognizer.transcribe_many``, offline decoding on
  ``--threads`` threads, each ONNX Runtime session on one thread: one
  features call per utterance, the encoder on batches of ``--batch_size``
  utterances of similar length (the rest of each utterance's frames on its
  own), greedy decoding per utterance;
- onnxruntime streaming: the same recogniser fed 60 ms pieces, as a live
  stream, ``--threads`` streams at a time.

It prints each real-time factor (seconds of compute per second of audio),
the speed of each ONNX Runtime mode relative to PyTorch (target >= 2x for
the whole-utterance mode on 2 cores), and the fraction of transcripts that
equal PyTorch's. Run it with OpenMP's default wait policy: under
``OMP_WAIT_POLICY=PASSIVE`` PyTorch's two threads are about 40% slower (RTF
0.0118 against 0.0081-0.0089 on the demo), which flatters ONNX Runtime (its
own thread pool ignores the variable); the header says which policy ran.
Without ``--bundle_dir`` the bundle is exported to a temporary directory
first (not timed).
"""

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from dev_set import add_dev_set_args, dev_entries

from caiman_asr_train.core.decoder import greedy_decode
from caiman_asr_train.core.load_hw import load_hw_checkpoint
from caiman_asr_train.data.audio import load_audio
from caiman_asr_train.data.features import FeaturePipeline, pad_audio
from caiman_asr_train.data.manifest import audio_path
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.deploy.onnxruntime_bundle import FINAL_PADDING_SECS
from caiman_asr_train.export.inference import export_inference
from caiman_asr_train.runtime import Recognizer

STREAM_PIECE_SECS = 0.06


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dev_set_args(parser)
    parser.add_argument(
        "--bundle_dir",
        type=Path,
        default=None,
        help="its ONNX Runtime bundle (default: export one to a temp dir)",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both runtimes (default: 2)")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=8,
        help="utterances per PyTorch batch, as val.py, and per ONNX Runtime encoder batch (default: 8)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds per mode; the median is reported (default: 3)"
    )
    return parser.parse_args()


def pytorch_decoder(hw_path: Path, batch_size: int):
    loaded = load_hw_checkpoint(hw_path)
    data = loaded.data_config
    features = {**data["filterbank_features"], "dither": 0.0}
    pipeline = FeaturePipeline(features, data["frame_splicing"], data["melmeans"], data["melvars"]).eval()
    tokenizer = Tokenizer(loaded.sentpiece_model_binary)
    sample_rate = int(features["sample_rate"])

    @torch.no_grad()
    def decode(audio: list[np.ndarray]) -> list[str]:
        texts = []
        for start in range(0, len(audio), batch_size):
            chunk = [torch.from_numpy(a) for a in audio[start : start + batch_size]]
            lens = torch.tensor([len(a) for a in chunk])
            batch = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True)
            waveform, lens = pad_audio(batch, lens, FINAL_PADDING_SECS, sample_rate)
            x, x_lens = pipeline(waveform, lens)
            texts.extend(tokenizer.detokenize(ids) for ids in greedy_decode(loaded.model, x, x_lens))
        return texts

    return decode


def streamed(recognizer: Recognizer, audio: np.ndarray) -> str:
    piece = int(STREAM_PIECE_SECS * recognizer.sample_rate)
    stream = recognizer.stream()
    for start in range(0, len(audio), piece):
        stream.accept_waveform(audio[start : start + piece])
    return stream.finish()


def concurrently(fn, items: list, workers: int) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    entries, dataset_dir = dev_entries(args)
    with tempfile.TemporaryDirectory() as scratch:
        bundle_dir = args.bundle_dir
        if bundle_dir is None:
            bundle_dir = Path(scratch) / "bundle"
            export_inference(args.ckpt, "onnxruntime", bundle_dir)
        recognizer = Recognizer(bundle_dir, num_threads=1)
        audio = [load_audio(audio_path(e, dataset_dir), recognizer.sample_rate) for e in entries]
        seconds = sum(len(a) for a in audio) / recognizer.sample_rate
        modes = {
            "pytorch": pytorch_decoder(args.ckpt, args.batch_size),
            "onnxruntime": lambda batch: recognizer.transcribe_many(
                batch, streams=args.threads, batch_size=args.batch_size
            ),
            "onnxruntime streaming": lambda batch: concurrently(
                lambda a: streamed(recognizer, a), batch, args.threads
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in modes}
        texts: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            for name, decode in modes.items():
                start = time.perf_counter()
                texts[name] = decode(audio)
                times[name].append(time.perf_counter() - start)
    print(
        f"{len(audio)} utterances, {seconds:.1f} s of audio, {args.threads} threads, median of {args.repeats}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}"
    )
    baseline = statistics.median(times["pytorch"])
    for name in modes:
        elapsed = statistics.median(times[name])
        same = sum(a == b for a, b in zip(texts[name], texts["pytorch"])) / max(1, len(audio))
        print(
            f"{name:22s} RTF {elapsed / seconds:.4f}  speed vs pytorch {baseline / elapsed:.2f}x  "
            f"identical transcripts {same * 100:.1f}%"
        )


if __name__ == "__main__":
    main()
