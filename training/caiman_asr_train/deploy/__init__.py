"""Inference artefacts for servers other than the FPGA one (docs/formats.md section 13).

Every graph is built by hand with ``onnx.helper`` from a hardware checkpoint's
float32 weights (``deploy.onnx_graphs``), so names and op layout are fixed and
documented here rather than left to an exporter. Opset 17, IR version 8.

Op layout (what a weight quantizer sees):

- LSTM layers are single-layer ONNX ``LSTM`` ops, one per layer, in the order
  of the state dict. Inputs ``W`` ``[1, 4H, in]``, ``R`` ``[1, 4H, H]`` and
  ``B`` ``[1, 8H]`` are float32 initializers named
  ``<state-dict prefix>.W_l<k>``, ``.R_l<k>``, ``.B_l<k>`` (e.g.
  ``encoder.pre_rnn.lstm.W_l0``); their gates are in ONNX order
  input, output, forget, cell (PyTorch's i, f, g, o rows reordered), so a
  per-output-row scale is still one scale per gate row. ``B`` is
  ``[bias_ih, bias_hh]`` and stays float32.
- Linear layers are ``MatMul`` with a float32 initializer ``<name>.weight_t``
  ``[in, out]`` (the transposed PyTorch weight) followed by ``Add`` of
  ``<name>.bias`` ``[out]``: ``joint_enc``, ``joint_pred``, ``joint_net.2``.
- The prediction network's embedding is a ``Gather`` from
  ``prediction.embed.table`` ``[n_classes, P]``: the PyTorch table plus an
  all-zero last row, so the blank id gives the zero start vector.
- ``features.onnx`` has no weights to quantize: its DFT basis (float32), mel
  filterbank and statistics (float64) are initializers named ``features.*``.

ONNX Runtime bundle (``onnxruntime`` target, read by ``caiman_asr_train.runtime``):

    features.onnx   history f32[H>=1], waveform f32[S] -> features f32[1, n_filt, T]
                    (normalised log-mels; see ``onnx_graphs.features_graph``)
    encoder.onnx    features f32[N, n_filt, T], pre_h/pre_c f32[Lpre, N, H],
                    post_h/post_c f32[Lpost, N, H] -> encoder_out f32[N, T', H] + new states
    predictor.onnx  token i64[N], h/c f32[Lpred, N, P] -> predictor_out f32[N, 1, P] + new states
    joint.onnx      encoder_out f32[N, T', H], predictor_out f32[N, 1, P] -> logits f32[N, T', n_classes]
    tokenizer.model, ngram.binary (when the checkpoint has one), bundle.json

sherpa-onnx bundle (``sherpa-onnx`` target, ``model_type="nemo_transducer"``):
``encoder.onnx`` (raw kaldi-native-fbank log-mels in, dataset normalisation and
frame splicing inside), ``decoder.onnx``, ``joiner.onnx``, ``tokens.txt``; see
``deploy.sherpa``.
"""

# Weight formats of the quantized exports (deploy/quantize.py). Defined here,
# free of torch, so that command lines can check a --quantize_type cheaply.
QUANTIZE_TYPES = ("int8_per_channel", "int8_blockwise", "int4_per_channel", "int4_blockwise")
DEFAULT_QUANTIZE_TYPE = "int8_per_channel"
