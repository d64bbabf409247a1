"""Torch-free inference with an ONNX Runtime bundle: onnxruntime, numpy and sentencepiece only.

``Recognizer(bundle_dir)`` streams audio to text with greedy decoding;
``evaluate_bundle`` scores a bundle on manifests. Nothing in this package
imports torch, so a server can run it without the training stack.
"""

from caiman_asr_train.runtime.evaluate import BundleResult, evaluate_bundle, evaluate_transcriber
from caiman_asr_train.runtime.recognizer import Recognizer, Stream

__all__ = ["BundleResult", "Recognizer", "Stream", "evaluate_bundle", "evaluate_transcriber"]
