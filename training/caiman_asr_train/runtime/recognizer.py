"""Streaming greedy recognition with an ONNX Runtime bundle: onnxruntime, numpy and sentencepiece only.

    recognizer = Recognizer("exports/demo-onnxruntime")
    stream = recognizer.stream()
    for chunk in chunks:                  # float32 mono audio at recognizer.sample_rate
        stream.accept_waveform(chunk)
        print(stream.text)                # partial transcript so far
    print(stream.finish())                # final transcript

Per stream: ``features.onnx`` turns each new piece of audio into normalised
log-mel frames (the samples a frame still needs are carried over); whenever
at least ``chunk_frames`` frames are waiting, the largest multiple of
``chunk_frames`` goes through ``encoder.onnx`` with the LSTM states carried
over; greedy decoding then walks the new encoder frames exactly as
``core.decoder.greedy_decode`` does (blank is the last class; at most
``max_symbols_per_step`` symbols per frame). ``finish()`` appends the
bundle's final padding of silence, as the server does at the end of a
stream, and encodes what is left. The transcripts equal PyTorch greedy
decoding of the whole utterance.
"""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

import numpy as np
import onnxruntime as ort

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.runtime.bundle import GRAPHS, TOKENIZER_FILE, read_bundle

PathLike = Union[str, Path]

# Encoder frames scored per joint call while searching for the next symbol:
# long enough to skip runs of blanks in one call, short enough that a symbol
# found early wastes little work.
JOINT_WINDOW = 16
# encoder.onnx's LSTM state inputs (and, in this order, its outputs after encoder_out)
_ENCODER_STATES = ("pre_h", "pre_c", "post_h", "post_c")


class Recognizer:
    """The sessions, tokenizer and settings of one bundle; ``stream()`` starts an utterance.

    Args:
        bundle_dir: a directory written by ``export_inference(..., "onnxruntime", ...)``.
        num_threads: ONNX Runtime intra-op threads (None: ONNX Runtime's default).
        max_symbols_per_step: per encoder frame, the most symbols emitted.
        final_padding_secs: seconds of silence ``finish()`` appends (None: the
            bundle's ``final_padding_secs``, 0.24 s, as the server does).
        verify_files: check every file's sha256 against bundle.json first.

    Raises:
        CheckpointError: the directory is not a readable bundle, or a graph
            cannot be loaded (one line naming the file).
    """

    def __init__(
        self,
        bundle_dir: PathLike,
        *,
        num_threads: int | None = None,
        max_symbols_per_step: int = 8,
        final_padding_secs: float | None = None,
        verify_files: bool = True,
    ):
        self.bundle_dir = Path(bundle_dir)
        self.info = read_bundle(self.bundle_dir, verify_files=verify_files)
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        self.sessions = {name: self._session(name, options) for name in GRAPHS}
        self.tokenizer = Tokenizer(self.bundle_dir / TOKENIZER_FILE)
        features, model = self.info["features"], self.info["model"]
        self.sample_rate = int(features["sample_rate"])
        self.blank_id = int(model["blank_id"])
        self.chunk_frames = int(self.info["chunk_frames"])
        self.max_symbols_per_step = int(max_symbols_per_step)
        padding = features["final_padding_secs"] if final_padding_secs is None else final_padding_secs
        self.final_padding = round(float(padding) * self.sample_rate)  # samples

    def _session(self, name: str, options: ort.SessionOptions) -> ort.InferenceSession:
        path = self.bundle_dir / f"{name}.onnx"
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for bad graphs
            detail = " ".join(str(exc).split())[:200]
            raise CheckpointError(
                f"{path} cannot be loaded by ONNX Runtime ({detail}); export the bundle again"
            ) from None

    def stream(self) -> "Stream":
        """A new utterance (streams are independent; each holds its own state)."""
        return Stream(self)

    def transcribe(self, audio: np.ndarray) -> str:
        """Transcript of a whole utterance: float32 mono ``[N]`` at ``sample_rate`` Hz."""
        stream = self.stream()
        stream.accept_waveform(audio)
        return stream.finish()

    def transcribe_many(
        self, audios: Sequence[np.ndarray], streams: int = 1, batch_size: int = 8
    ) -> list[str]:
        """Transcripts of whole utterances, decoded offline by ``streams`` threads.

        With every utterance at hand there is no stream to wait for: each
        utterance's log-mels (final padding included) come from one
        ``features.onnx`` call; ``encoder.onnx`` runs on batches of up to
        ``batch_size`` utterances of similar length (one batched call costs
        little more than one utterance's) and finishes each utterance's last
        frames on their own (``_encode_batch``: no padding); greedy decoding
        then walks each utterance's frames. ONNX Runtime releases the GIL while
        a graph runs and the sessions may be shared, so the threads overlap.
        The transcripts are ``transcribe``'s.
        """
        if not audios:
            return []
        with ThreadPoolExecutor(max(1, streams)) as pool:
            features = list(pool.map(self._features, audios))
            order = sorted(range(len(audios)), key=lambda i: features[i].shape[2])
            size = max(1, batch_size)
            batches = [order[i : i + size] for i in range(0, len(order), size)]
            encoded: list[np.ndarray] = [np.empty(0)] * len(audios)
            for batch, outputs in zip(
                batches, pool.map(lambda batch: self._encode_batch([features[i] for i in batch]), batches)
            ):
                for i, output in zip(batch, outputs):
                    encoded[i] = output
            return list(pool.map(self._decode_whole, encoded))

    def _features(self, audio: np.ndarray) -> np.ndarray:
        """Normalised log-mels ``[1, n_filt, T]`` of a whole utterance with its final padding."""
        waveform = np.concatenate(
            [np.asarray(audio, np.float32).reshape(-1), np.zeros(self.final_padding, np.float32)]
        )
        (frames,) = self.sessions["features"].run(
            None, {"history": self._start_history(), "waveform": waveform}
        )
        return frames

    def _start_history(self) -> np.ndarray:
        """``features.onnx``'s history at the start of an utterance: the initial padding, plus
        the sample pre-emphasis reads before it."""
        return np.zeros(int(self.info["features"]["initial_padding"]) + 1, np.float32)

    def _encode_batch(self, features: list[np.ndarray]) -> list[np.ndarray]:
        """Encoder frames ``[1, T', H]`` of each utterance: the frames all of them have, as one batch.

        The batch runs over the largest multiple of ``chunk_frames`` that every
        utterance has; each then encodes the rest of its frames on its own from
        the batch's LSTM states, as a stream would. So nothing is padded and
        the frames equal a stream's.
        """
        model = self.info["model"]
        common = min(f.shape[2] for f in features) // self.chunk_frames * self.chunk_frames
        heads: list[np.ndarray] = [np.zeros((1, 0, model["enc_n_hid"]), np.float32)] * len(features)
        states = [self._zero_states(1)] * len(features)
        if common:
            batch = np.concatenate([f[:, :, :common] for f in features])
            outputs = self.sessions["encoder"].run(
                None, {"features": batch, **self._zero_states(len(features))}
            )
            heads = [outputs[0][k : k + 1] for k in range(len(features))]
            states = [
                dict(zip(_ENCODER_STATES, (state[:, k : k + 1] for state in outputs[1:])))
                for k in range(len(features))
            ]
        encoded = []
        for f, head, state in zip(features, heads, states):
            if f.shape[2] > common:
                (tail, *_) = self.sessions["encoder"].run(None, {"features": f[:, :, common:], **state})
                head = np.concatenate([head, tail], axis=1)
            encoded.append(head)
        return encoded

    def _zero_states(self, batch: int) -> dict[str, np.ndarray]:
        model = self.info["model"]
        return {
            name: np.zeros((model[f"enc_{name[:-2]}_rnn_layers"], batch, model["enc_n_hid"]), np.float32)
            for name in _ENCODER_STATES
        }

    def _decode_whole(self, encoded: np.ndarray) -> str:
        stream = Stream(self)
        stream._decode(encoded)
        stream.finished = True
        return stream.text


class Stream:
    """One utterance being recognised; made by ``Recognizer.stream()``."""

    def __init__(self, recognizer: Recognizer):
        self._r = recognizer
        features, model = recognizer.info["features"], recognizer.info["model"]
        self._hop = int(features["hop_length"])
        self._history = recognizer._start_history()
        self._pending = np.zeros((1, int(features["n_filt"]), 0), np.float32)

        def zeros(layers: int, hidden: int) -> np.ndarray:
            return np.zeros((layers, 1, hidden), np.float32)

        self._encoder_states = recognizer._zero_states(1)
        h = zeros(model["pred_rnn_layers"], model["pred_n_hid"])
        # The blank id is the zero start input.
        self._g, self._h, self._c = self._predict(recognizer.blank_id, h, h)
        self.tokens: list[int] = []
        self.finished = False

    @property
    def text(self) -> str:
        """The transcript of the audio decoded so far."""
        return self._r.tokenizer.detokenize(self.tokens)

    def accept_waveform(self, samples: np.ndarray) -> None:
        """Feed the next float32 mono samples (any length, at the bundle's sample rate)."""
        if self.finished:
            raise RuntimeError("accept_waveform after finish(); start a new stream")
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        (frames,) = self._r.sessions["features"].run(None, {"history": self._history, "waveform": samples})
        self._history = np.concatenate([self._history, samples])[frames.shape[2] * self._hop :]
        self._pending = np.concatenate([self._pending, frames], axis=2)
        ready = self._pending.shape[2] // self._r.chunk_frames * self._r.chunk_frames
        if ready:
            self._encode(self._pending[:, :, :ready])
            self._pending = self._pending[:, :, ready:]

    def finish(self) -> str:
        """Append the final padding, decode the rest and return the final transcript."""
        if not self.finished:
            self.accept_waveform(np.zeros(self._r.final_padding, np.float32))
            if self._pending.shape[2]:
                self._encode(self._pending)
            self.finished = True
        return self.text

    def _encode(self, features: np.ndarray) -> None:
        outputs = self._r.sessions["encoder"].run(None, {"features": features, **self._encoder_states})
        self._encoder_states = dict(zip(_ENCODER_STATES, outputs[1:]))
        self._decode(outputs[0])

    def _predict(self, token: int, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g, h, c = self._r.sessions["predictor"].run(
            None, {"token": np.array([token], np.int64), "h": h, "c": c}
        )
        return g, h, c

    def _decode(self, encoded: np.ndarray) -> None:
        """Greedy decoding of encoder frames ``encoded`` [1, T, H] from the current predictor state."""
        joint, blank, limit = self._r.sessions["joint"], self._r.blank_id, self._r.max_symbols_per_step
        t, frames, emitted = 0, encoded.shape[1], 0  # emitted: symbols at frame t
        while t < frames:
            (logits,) = joint.run(
                None, {"encoder_out": encoded[:, t : t + JOINT_WINDOW], "predictor_out": self._g}
            )
            labels = logits[0].argmax(axis=-1)
            hits = np.flatnonzero(labels != blank)
            if hits.size == 0:
                t += labels.shape[0]
                emitted = 0
                continue
            if hits[0]:
                t += int(hits[0])
                emitted = 0
            label = int(labels[hits[0]])
            self.tokens.append(label)
            self._g, self._h, self._c = self._predict(label, self._h, self._c)
            emitted += 1
            if emitted == limit:
                t += 1
                emitted = 0
