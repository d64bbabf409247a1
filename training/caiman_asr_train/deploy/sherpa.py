"""Write a sherpa-onnx bundle: a NeMo-style transducer that ``OfflineRecognizer.from_transducer(...,
model_type="nemo_transducer")`` loads (docs/formats.md section 13).

Files:

    encoder.onnx  audio_signal f32[N, n_filt, T] (sherpa-onnx's log-mel features), length i64[N]
                  -> outputs f32[N, H, T'], encoded_lengths i64[N]; dataset normalisation and frame
                  splicing are inside. Metadata: vocab_size (without blank), subsampling_factor,
                  normalize_type "" (none: the graph normalises), pred_rnn_layers, pred_hidden,
                  feat_dim, and the source checkpoint's sha256 and step.
    decoder.onnx  targets i32[N, 1], target_length i32[N], states.1/states.2 f32[L, N, P]
                  -> decoder_output f32[N, P, 1], decoder_output_length, states.1_out, states.2_out;
                  the blank id gives the zero start input, as sherpa-onnx starts decoding with blank.
    joiner.onnx   encoder_output f32[N, H, 1], decoder_output f32[N, P, 1] -> logits f32[N, 1, 1, n_classes]
    tokens.txt    "<piece> <id>" per line, the SentencePiece pieces then "<blk>" last

sherpa-onnx computes the features itself with kaldi-native-fbank. For NeMo
transducers it sets low_freq 0, ``is_librosa`` (Slaney mel) and no DC-offset
removal, and keeps its other defaults: 25 ms frames every 10 ms,
pre-emphasis 0.97, no dither, ``snip_edges`` false; none of these can be set
from its Python API. What still differs from docs/formats.md section 6: the "povey"
window (Hann to the power 0.85) instead of DALI's Hann; the frame positions
(the first frame is centred on sample 0 with reflected edges, where we
prepend ``window_size - window_stride`` of zeros: a 7.5 ms shift); its mel
upper edge (``high_freq`` -400, 400 Hz below Nyquist, in kaldi's
convention); its log floor (float epsilon instead of 1e-20). Transcripts can
therefore differ from PyTorch's; ``export_inference(...,
verify_manifests=...)`` measures by how much (``sherpa_transcriber`` appends
the server's 0.24 s of final silence). Models trained with windows other
than 25 ms do not fit this front end.
"""

from pathlib import Path
from typing import Union

import onnx
import sentencepiece as spm

from caiman_asr_train.deploy.onnx_graphs import encoder_graph, joint_graph, predictor_graph
from caiman_asr_train.deploy.onnxruntime_bundle import numpy_weights

PathLike = Union[str, Path]

BLANK_TOKEN = "<blk>"


def tokens_txt(sentpiece_model: bytes) -> str:
    """sherpa-onnx's symbol table: every SentencePiece piece with its id, then the blank last."""
    processor = spm.SentencePieceProcessor(model_proto=sentpiece_model)
    lines = [f"{processor.id_to_piece(i)} {i}" for i in range(processor.get_piece_size())]
    lines.append(f"{BLANK_TOKEN} {processor.get_piece_size()}")
    return "\n".join(lines) + "\n"


def write_sherpa_bundle(hw: dict, directory: PathLike, source_sha256: str) -> None:
    """Write the four sherpa-onnx files of ``hw`` into the existing, empty ``directory``."""
    directory = Path(directory)
    cfg = hw["rnnt_config"]
    model, val = cfg["rnnt"], cfg["input_val"]
    weights = numpy_weights(hw)
    metadata = {
        "vocab_size": weights["joint_net.2.weight"].shape[0] - 1,
        "subsampling_factor": int(val["frame_splicing"]["frame_subsampling"])
        * int(model["enc_stack_time_factor"]),
        "normalize_type": "",
        "pred_rnn_layers": int(model["pred_rnn_layers"]),
        "pred_hidden": int(model["pred_n_hid"]),
        "feat_dim": int(val["filterbank_features"]["n_filt"]),
        "source_sha256": source_sha256,
        "step": int(hw["step"]),
    }
    encoder = encoder_graph(
        weights,
        model,
        val["frame_splicing"],
        layout="sherpa",
        melmeans=hw["melmeans"].numpy(),
        melvars=hw["melvars"].numpy(),
        metadata=metadata,
    )
    onnx.save(encoder, directory / "encoder.onnx")
    onnx.save(predictor_graph(weights, model, layout="sherpa"), directory / "decoder.onnx")
    onnx.save(joint_graph(weights, layout="sherpa"), directory / "joiner.onnx")
    (directory / "tokens.txt").write_text(tokens_txt(hw["sentpiece_model"]), encoding="utf-8")
