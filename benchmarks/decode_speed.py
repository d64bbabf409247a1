"""Decoding speed and WER: greedy vs beam search vs beam search with the n-gram, on the demo dev set.

Usage (from the repository root, after ./train.sh):

    .venv/bin/python benchmarks/decode_speed.py
    .venv/bin/python benchmarks/decode_speed.py --ckpt results/RNN-T_best_checkpoint.hw.pt \\
        --val_manifests datasets/demo/dev.json --repeats 3

Decodes every utterance of the manifests with each decoder, exactly as
``val.py`` does (final padding, features, encoder, search, detokenising), from
audio already read into memory, and prints per decoder:

    WER                      on the manifests (the same dither noise for every decoder)
    audio s / compute s      seconds of audio decoded per second of compute (best of --repeats)
    time / greedy            compute time over greedy decoding's, measured in the same run
    search / greedy search   the same ratio for the search alone (encoder output computed once)

Targets (issue 13): beam + n-gram at most 3x greedy's time, and at least 10%
relative lower WER than greedy.
"""

import argparse
import time

import torch
from dev_set import REPO, add_dev_set_args, dev_entries
from torch.utils.data import DataLoader

from caiman_asr_train.core.decoder import greedy_search
from caiman_asr_train.core.load_hw import read_checkpoint
from caiman_asr_train.data.dataset import AudioDataset, collate
from caiman_asr_train.evaluate.decoding import Decoder, add_decoder_args, build_decoder, encoder_frame_seconds
from caiman_asr_train.evaluate.evaluator import evaluate, featurize
from caiman_asr_train.train_utils.checkpoints import load_for_validation


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Greedy vs beam vs beam+n-gram decoding: speed and WER.")
    add_dev_set_args(parser)
    parser.add_argument(
        "--val_batch_size", type=int, default=8, help="utterances decoded together (default: 8)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs per decoder; the best counts (default: 2)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    add_decoder_args(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    entries, dataset_dir = dev_entries(args)
    target = load_for_validation(args.ckpt, REPO / "training/configs/demo.yaml", device)
    dataset = AudioDataset(entries, dataset_dir, target.sample_rate, **target.text)
    batches = list(DataLoader(dataset, batch_size=args.val_batch_size, collate_fn=collate))
    audio_seconds = sum(float(b.audio_lens.sum()) for b in batches) / target.sample_rate
    embedded = read_checkpoint(args.ckpt)["ngram"] if target.kind == "hardware" else None
    frame_seconds = encoder_frame_seconds(target.pipeline, target.model, target.sample_rate)

    def decoder(kind: str, skip_ngram: bool) -> Decoder:
        options = argparse.Namespace(**{**vars(args), "decoder": kind, "skip_ngram": skip_ngram})
        return build_decoder(
            options,
            target.tokenizer,
            frame_seconds=frame_seconds,
            source=str(args.ckpt),
            embedded_ngram=embedded,
        )

    decoders = {
        "greedy": decoder("greedy", True),
        "beam": decoder("beam", True),
        "beam + n-gram": decoder("beam", False),
    }
    if decoders["beam + n-gram"].ngram is None:
        del decoders["beam + n-gram"]

    # Encoder output once, for timing the search alone.
    generator = torch.Generator().manual_seed(1)
    target.pipeline.eval()
    with torch.no_grad():
        encoded = []
        for batch in batches:
            x, x_lens = featurize(batch, target.pipeline, target.sample_rate, 0.24, device, generator)
            encoded.append(target.model.encode(x, x_lens)[:2])

    rows = {}
    for name, dec in decoders.items():
        times, search_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = evaluate(
                target.model,
                batches,
                target.pipeline,
                target.tokenizer,
                sample_rate=target.sample_rate,
                progress=False,
                generator=torch.Generator().manual_seed(1),
                decoder=dec,
                **target.scoring,
            )
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                for f, f_lens in encoded:
                    if dec.kind == "greedy":
                        greedy_search(target.model, f, f_lens, dec.max_symbols_per_step)
                    else:
                        dec.search(target.model).decode_encoded(f, f_lens)
            search_times.append(time.perf_counter() - start)
        rows[name] = (result.wer, min(times), min(search_times))

    greedy_time, greedy_search_time = rows["greedy"][1], rows["greedy"][2]
    print(
        f"{len(entries)} utterances, {audio_seconds:.1f} s of audio, batch {args.val_batch_size}, "
        f"beam width {args.beam_width}, {args.beam_decoder_procs} beam process(es), {args.threads} torch thread(s)"
    )
    print(
        f"{'decoder':<15} {'WER':>8} {'audio s / compute s':>20} {'time / greedy':>14} {'search / greedy search':>23}"
    )
    for name, (wer, seconds, search) in rows.items():
        print(
            f"{name:<15} {wer * 100:>7.3f}% {audio_seconds / seconds:>20.1f} {seconds / greedy_time:>14.2f} "
            f"{search / greedy_search_time:>23.2f}"
        )
    if "beam + n-gram" in rows:
        relative = 1 - rows["beam + n-gram"][0] / rows["greedy"][0] if rows["greedy"][0] else 0.0
        print(
            f"beam + n-gram vs greedy: {relative * 100:.1f}% relative WER reduction (target >= 10%), "
            f"{rows['beam + n-gram'][1] / greedy_time:.2f}x the time (target <= 3x)"
        )


if __name__ == "__main__":
    main()
