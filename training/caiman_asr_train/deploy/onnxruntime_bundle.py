"""Write an ONNX Runtime bundle (layout in ``caiman_asr_train.runtime.bundle``) from a hardware checkpoint."""

from collections.abc import Callable
from pathlib import Path
from typing import Union

import numpy as np
import onnx

from caiman_asr_train.data.features import FilterbankFeatures
from caiman_asr_train.deploy.onnx_graphs import encoder_graph, features_graph, joint_graph, predictor_graph
from caiman_asr_train.runtime.bundle import NGRAM_FILE, TOKENIZER_FILE, bundle_description, write_bundle_json

PathLike = Union[str, Path]

# Seconds of silence appended at the end of a stream, as the server (and val.py) does.
FINAL_PADDING_SECS = 0.24
# How hardware checkpoints are scored (they keep no audio_dataset block): the shipped configs' settings.
HW_TEXT = {"normalize_transcripts": "lowercase", "standardize_wer": True, "error_rate": "word"}


def numpy_weights(hw: dict) -> dict[str, np.ndarray]:
    """The hardware checkpoint's state dict as float32 numpy arrays."""
    return {name: tensor.detach().cpu().float().numpy() for name, tensor in hw["state_dict"].items()}


def write_graphs(hw: dict, directory: PathLike) -> None:
    """Write features.onnx, encoder.onnx, predictor.onnx and joint.onnx of ``hw`` into ``directory``."""
    directory = Path(directory)
    cfg = hw["rnnt_config"]
    weights = numpy_weights(hw)
    val = cfg["input_val"]
    graphs = {
        "features": features_graph(val["filterbank_features"], hw["melmeans"].numpy(), hw["melvars"].numpy()),
        "encoder": encoder_graph(weights, cfg["rnnt"], val["frame_splicing"]),
        "predictor": predictor_graph(weights, cfg["rnnt"]),
        "joint": joint_graph(weights),
    }
    for name, graph in graphs.items():
        onnx.save(graph, directory / f"{name}.onnx")


def write_onnxruntime_bundle(
    hw: dict, directory: PathLike, source_sha256: str, quantize: Callable[[Path], str] | None = None
) -> dict:
    """Write every file of the bundle into the existing, empty ``directory``; bundle.json last.

    Args:
        hw: a validated hardware-checkpoint dict.
        source_sha256: hex sha256 of the checkpoint file it came from.
        quantize: called with the directory after the graphs are written and
            before bundle.json (so the file hashes cover the quantized graphs);
            returns the quantization type recorded in bundle.json.
    Returns:
        the bundle.json dict.
    """
    directory = Path(directory)
    write_graphs(hw, directory)
    (directory / TOKENIZER_FILE).write_bytes(hw["sentpiece_model"])
    if hw["ngram"]["binary"] is not None:
        (directory / NGRAM_FILE).write_bytes(hw["ngram"]["binary"])
    quantize_type = quantize(directory) if quantize is not None else None
    cfg = hw["rnnt_config"]
    model, val = cfg["rnnt"], cfg["input_val"]
    front_end = FilterbankFeatures(**val["filterbank_features"])
    n_classes = int(hw["state_dict"]["joint_net.2.weight"].shape[0])
    info = bundle_description(
        directory,
        source={
            "sha256": source_sha256,
            "step": int(hw["step"]),
            "epoch": int(hw["epoch"]),
            "hw_version": hw["version"],
        },
        model={
            "n_classes": n_classes,
            "blank_id": n_classes - 1,
            **{
                key: int(model[key])
                for key in (
                    "enc_n_hid",
                    "enc_pre_rnn_layers",
                    "enc_post_rnn_layers",
                    "pred_n_hid",
                    "pred_rnn_layers",
                )
            },
        },
        features={
            "sample_rate": front_end.sample_rate,
            "win_length": front_end.win_length,
            "hop_length": front_end.hop_length,
            "initial_padding": front_end.initial_padding,
            "final_padding_secs": FINAL_PADDING_SECS,
            "n_filt": front_end.n_filt,
            "frame_stacking": int(val["frame_splicing"]["frame_stacking"]),
            "frame_subsampling": int(val["frame_splicing"]["frame_subsampling"]),
        },
        chunk_frames=int(val["frame_splicing"]["frame_subsampling"]) * int(model["enc_stack_time_factor"]),
        text={"labels": list(cfg["tokenizer"]["labels"]), **HW_TEXT},
        quantize_type=quantize_type,
    )
    write_bundle_json(info, directory)
    return info
