"""Build the transducer's ONNX graphs by hand from hardware-checkpoint weights.

Names, shapes and op layout are documented in ``caiman_asr_train.deploy``.
Every builder takes the weights as ``{state-dict name: float32 ndarray}`` and
the validated ``rnnt_config`` sections, and returns an ``onnx.ModelProto``
that passes ``onnx.checker``. ``layout`` selects the input and output layout:
``"bundle"`` for the ONNX Runtime bundle (streaming, batch-first outputs),
``"sherpa"`` for sherpa-onnx's NeMo transducer loader.
"""

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.data.features import LOG_FLOOR, PREEMPHASIS, FilterbankFeatures

OPSET = 17
IR_VERSION = 8
LAYOUTS = ("bundle", "sherpa")

Weights = Mapping[str, np.ndarray]


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs of one graph; ``model()`` checks and returns it."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._counter = 0

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, values: list) -> str:
        """An int64 1-D initializer (axes, shapes, pads)."""
        return self.const(self.fresh("ints"), np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list, n_outputs: int = 1, out: list | None = None, **attrs):
        """Add a node; returns its output name (or the list of names when ``n_outputs > 1``)."""
        outputs = out or [self.fresh(op_type.lower()) for _ in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def linear(self, x: str, weights: Weights, name: str) -> str:
        """``x @ W.T + b`` for the PyTorch Linear ``name`` (MatMul + Add, see the package docstring)."""
        w = self.const(f"{name}.weight_t", weights[f"{name}.weight"].T.astype(np.float32))
        b = self.const(f"{name}.bias", weights[f"{name}.bias"].astype(np.float32))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def lstm(
        self, x: str, weights: Weights, prefix: str, layers: int, h: str, c: str
    ) -> tuple[str, str, str]:
        """Stacked LSTM over x [T, N, in] with states h, c [layers, N, H].

        Returns (y [T, N, H], h_n [layers, N, H], c_n [layers, N, H]).
        """
        h_out, c_out = [], []
        for k in range(layers):
            w_ih, w_hh = weights[f"{prefix}.weight_ih_l{k}"], weights[f"{prefix}.weight_hh_l{k}"]
            hidden = w_hh.shape[1]
            W = self.const(f"{prefix}.W_l{k}", _onnx_gates(w_ih, hidden)[None])
            R = self.const(f"{prefix}.R_l{k}", _onnx_gates(w_hh, hidden)[None])
            bias = np.concatenate(
                [
                    _onnx_gates(weights[f"{prefix}.bias_ih_l{k}"], hidden),
                    _onnx_gates(weights[f"{prefix}.bias_hh_l{k}"], hidden),
                ]
            )
            B = self.const(f"{prefix}.B_l{k}", bias[None])
            start, end = self.ints([k]), self.ints([k + 1])
            h0 = self.op("Slice", [h, start, end])
            c0 = self.op("Slice", [c, start, end])
            y, y_h, y_c = self.op("LSTM", [x, W, R, B, "", h0, c0], n_outputs=3, hidden_size=hidden)
            x = self.op("Squeeze", [y, self.ints([1])])  # [T, 1, N, H] -> [T, N, H]
            h_out.append(y_h)
            c_out.append(y_c)
        h_n = h_out[0] if layers == 1 else self.op("Concat", h_out, axis=0)
        c_n = c_out[0] if layers == 1 else self.op("Concat", c_out, axis=0)
        return x, h_n, c_n

    def model(self, metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="caiman_asr_train"
        )
        model.ir_version = IR_VERSION
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.checker.check_model(model, full_check=True)
        return model


def _onnx_gates(w: np.ndarray, hidden: int) -> np.ndarray:
    """PyTorch gate rows (input, forget, cell, output) -> ONNX order (input, output, forget, cell)."""
    i, f, g, o = (w[n * hidden : (n + 1) * hidden] for n in range(4))
    return np.concatenate([i, o, f, g]).astype(np.float32)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def features_graph(
    filterbank_features: Mapping, melmeans: np.ndarray, melvars: np.ndarray
) -> onnx.ModelProto:
    """Waveform -> dataset-normalised log-mel frames, the docs/formats.md section 6 front end without dither.

    Inputs:
        history f32[H], H >= 1: the raw samples just before ``waveform``. At the
            start of a stream pass ``initial_padding + 1`` zeros (the server's
            initial padding, plus the sample pre-emphasis reads before it).
        waveform f32[S]: new samples, full scale 1.0.
    Output:
        features f32[1, n_filt, T]: frame t covers samples ``[t*hop, t*hop + win)``
        of the pre-emphasised ``concat(history, waveform)[1:]``, so
        ``T = max(0, 1 + (H - 1 + S - win) // hop)``; the next call's history is
        ``concat(history, waveform)[T*hop:]``.

    Window, mel filterbank, pre-emphasis and log floor are taken from the
    PyTorch front end. Pre-emphasis, the power spectrum's sum, the mel
    filterbank, the log and the normalisation are computed in float64 as
    there; the windowed DFT in float32 (log-mels within about 1e-5 of it).
    """
    front_end = FilterbankFeatures(**{**filterbank_features, "dither": 0.0})
    win, hop, n_fft = front_end.win_length, front_end.hop_length, front_end.n_fft
    window = front_end.window.double().numpy()
    n = np.arange(win)[:, None]
    k = np.arange(n_fft // 2 + 1)[None, :]
    angle = 2.0 * np.pi * ((n * k) % n_fft) / n_fft
    g = GraphBuilder("features")
    history = g.input("history", TensorProto.FLOAT, ["history_samples"])
    waveform = g.input("waveform", TensorProto.FLOAT, ["samples"])
    samples = g.op("Cast", [g.op("Concat", [history, waveform], axis=0)], to=TensorProto.DOUBLE)
    previous = g.op("Slice", [samples, g.ints([0]), g.ints([-1])])
    current = g.op("Slice", [samples, g.ints([1]), g.ints([np.iinfo(np.int64).max])])
    emphasised = g.op(
        "Sub", [current, g.op("Mul", [previous, g.const("features.preemphasis", np.array(PREEMPHASIS))])]
    )
    # frames = max(0, len - win + hop) // hop: integer Div truncates, so keep the numerator >= 0
    length = g.op("Shape", [emphasised])
    numerator = g.op("Max", [g.op("Add", [length, g.ints([hop - win])]), g.ints([0])])
    frames = g.op("Div", [numerator, g.ints([hop])])
    starts = g.op(
        "Mul",
        [
            g.op(
                "Range",
                [
                    g.const("features.zero", np.array(0, np.int64)),
                    g.op("Squeeze", [frames]),
                    g.const("features.one", np.array(1, np.int64)),
                ],
            ),
            g.const("features.hop", np.array(hop, np.int64)),
        ],
    )
    index = g.op(
        "Add",
        [
            g.op("Unsqueeze", [starts, g.ints([1])]),
            g.const("features.offsets", np.arange(win, dtype=np.int64)[None]),
        ],
    )
    # The DFT in float32: MLAS's single-precision matrix product is several times as fast as
    # its double one, and the log-mels move by about 1e-5 (the float64 product was 60% of
    # the recogniser's feature time).
    emphasised32 = g.op("Cast", [emphasised], to=TensorProto.FLOAT)
    framed = g.op("Gather", [emphasised32, index], axis=0)  # [T, win]
    basis = np.concatenate([window[:, None] * np.cos(angle), window[:, None] * np.sin(angle)], axis=1)
    spectrum = g.op("MatMul", [framed, g.const("features.dft", basis.astype(np.float32))])  # [T, 2 * bins]
    squared = g.op("Cast", [g.op("Mul", [spectrum, spectrum])], to=TensorProto.DOUBLE)
    bins = n_fft // 2 + 1
    real2 = g.op("Slice", [squared, g.ints([0]), g.ints([bins]), g.ints([1])])
    imag2 = g.op("Slice", [squared, g.ints([bins]), g.ints([2 * bins]), g.ints([1])])
    power = g.op("Add", [real2, imag2])
    mel = g.op("MatMul", [power, g.const("features.mel_t", front_end.fbanks.double().numpy().T)])
    logmel = g.op("Log", [g.op("Max", [mel, g.const("features.log_floor", np.array(LOG_FLOOR))])])
    means = g.const("features.melmeans", np.asarray(melmeans, np.float32).astype(np.float64))
    stds = g.const("features.melstds", np.sqrt(np.asarray(melvars, np.float32)).astype(np.float64))
    normalised = g.op("Cast", [g.op("Div", [g.op("Sub", [logmel, means]), stds])], to=TensorProto.FLOAT)
    g.op("Unsqueeze", [g.op("Transpose", [normalised], perm=[1, 0]), g.ints([0])], out=["features"])
    g.output("features", TensorProto.FLOAT, [1, front_end.n_filt, "frames"])
    return g.model()


def encoder_graph(
    weights: Weights,
    model: Mapping,
    frame_splicing: Mapping,
    *,
    layout: str = "bundle",
    melmeans: np.ndarray | None = None,
    melvars: np.ndarray | None = None,
    metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """Frame splicing, pre-RNN, StackTime and post-RNN on a chunk of log-mel frames.

    ``layout="bundle"`` (streaming, one utterance length per batch):
        features f32[N, n_filt, T] (normalised), pre_h/pre_c f32[Lpre, N, H],
        post_h/post_c f32[Lpost, N, H] -> encoder_out f32[N, T', H],
        pre_h_out, pre_c_out, post_h_out, post_c_out; T' = ceil(ceil(T/sub)/stack).
        Chunks of a multiple of ``frame_subsampling * enc_stack_time_factor``
        frames with the states carried over equal the whole utterance
        (``frame_stacking <= frame_subsampling`` is required for that).
    ``layout="sherpa"`` (whole utterances, padded batches):
        audio_signal f32[N, n_filt, T] (raw log-mels: ``melmeans``/``melvars``
        normalise them inside), length i64[N] -> outputs f32[N, H, T'],
        encoded_lengths i64[N]; frames past each length are zeros, as in
        PyTorch, so a padded batch gives each utterance its own result.
    """
    _check_layout(layout)
    stacking = int(frame_splicing["frame_stacking"])
    subsampling = int(frame_splicing["frame_subsampling"])
    stack_time = int(model["enc_stack_time_factor"])
    hidden = int(model["enc_n_hid"])
    pre_layers, post_layers = int(model["enc_pre_rnn_layers"]), int(model["enc_post_rnn_layers"])
    n_filt = weights["encoder.pre_rnn.lstm.weight_ih_l0"].shape[1] // stacking
    g = GraphBuilder("encoder")
    if layout == "bundle":
        if stacking > subsampling:
            raise CheckpointError(
                f"frame_stacking {stacking} > frame_subsampling {subsampling}: streaming chunks would need "
                "frames carried over; export the sherpa-onnx target or use stacking <= subsampling"
            )
        x = g.input("features", TensorProto.FLOAT, ["N", n_filt, "T"])
        states = {
            name: g.input(name, TensorProto.FLOAT, [layers, "N", hidden])
            for name, layers in (
                ("pre_h", pre_layers),
                ("pre_c", pre_layers),
                ("post_h", post_layers),
                ("post_c", post_layers),
            )
        }
        lengths = None
    else:
        x = g.input("audio_signal", TensorProto.FLOAT, ["N", n_filt, "T"])
        lengths = g.input("length", TensorProto.INT64, ["N"])
        means = g.const("encoder.melmeans", np.asarray(melmeans, np.float32)[:, None])
        stds = g.const("encoder.melstds", np.sqrt(np.asarray(melvars, np.float32))[:, None])
        x = _zero_past(g, g.op("Div", [g.op("Sub", [x, means]), stds]), lengths, time_axis=2)
        batch = g.op("Slice", [g.op("Shape", [x]), g.ints([0]), g.ints([1])])
        zeros = g.op(
            "ConstantOfShape",
            [g.op("Concat", [g.ints([max(pre_layers, post_layers)]), batch, g.ints([hidden])], axis=0)],
            value=numpy_helper.from_array(np.zeros(1, np.float32)),
        )
        states = {name: zeros for name in ("pre_h", "pre_c", "post_h", "post_c")}

    # Splice: frame t gets frames t .. t+stacking-1 (zeros past the end), keep every subsampling-th.
    padded = g.op("Pad", [x, g.ints([0, 0, 0, 0, 0, stacking - 1])])
    length_t = g.op("Slice", [g.op("Shape", [x]), g.ints([2]), g.ints([3])])
    shifted = [
        g.op("Slice", [padded, g.ints([k]), g.op("Add", [length_t, g.ints([k])]), g.ints([2])])
        for k in range(stacking)
    ]
    spliced = shifted[0] if stacking == 1 else g.op("Concat", shifted, axis=1)
    spliced = g.op(
        "Slice", [spliced, g.ints([0]), g.ints([np.iinfo(np.int64).max]), g.ints([2]), g.ints([subsampling])]
    )
    h = g.op("Transpose", [spliced], perm=[2, 0, 1])  # [T1, N, in_feats]
    if lengths is not None:
        lengths = _ceil_div(g, lengths, subsampling)

    def layer_states(name: str, layers: int) -> str:
        if layout == "bundle":
            return states[name]
        return g.op("Slice", [states[name], g.ints([0]), g.ints([layers])])

    h, pre_h, pre_c = g.lstm(
        h,
        weights,
        "encoder.pre_rnn.lstm",
        pre_layers,
        layer_states("pre_h", pre_layers),
        layer_states("pre_c", pre_layers),
    )
    if lengths is not None:
        h = _zero_past(g, h, lengths, time_axis=0)
    # StackTime: pad the time axis to a multiple of the factor, then fold factor frames into features.
    t1 = g.op("Slice", [g.op("Shape", [h]), g.ints([0]), g.ints([1])])
    pad = g.op(
        "Mod",
        [g.op("Sub", [g.ints([stack_time]), g.op("Mod", [t1, g.ints([stack_time])])]), g.ints([stack_time])],
    )
    h = g.op("Pad", [h, g.op("Concat", [g.ints([0, 0, 0]), pad, g.ints([0, 0])], axis=0)])
    h = g.op("Reshape", [g.op("Transpose", [h], perm=[1, 0, 2]), g.ints([0, -1, stack_time * hidden])])
    h = g.op("Transpose", [h], perm=[1, 0, 2])  # [T', N, stack*H]
    h, post_h, post_c = g.lstm(
        h,
        weights,
        "encoder.post_rnn.lstm",
        post_layers,
        layer_states("post_h", post_layers),
        layer_states("post_c", post_layers),
    )

    if layout == "bundle":
        g.op("Transpose", [h], perm=[1, 0, 2], out=["encoder_out"])
        g.output("encoder_out", TensorProto.FLOAT, ["N", "T_out", hidden])
        for name, value, layers in (
            ("pre_h", pre_h, pre_layers),
            ("pre_c", pre_c, pre_layers),
            ("post_h", post_h, post_layers),
            ("post_c", post_c, post_layers),
        ):
            g.op("Identity", [value], out=[f"{name}_out"])
            g.output(f"{name}_out", TensorProto.FLOAT, [layers, "N", hidden])
    else:
        g.op("Transpose", [h], perm=[1, 2, 0], out=["outputs"])
        g.output("outputs", TensorProto.FLOAT, ["N", hidden, "T_out"])
        g.op("Identity", [_ceil_div(g, lengths, stack_time)], out=["encoded_lengths"])
        g.output("encoded_lengths", TensorProto.INT64, ["N"])
    return g.model(metadata)


def _ceil_div(g: GraphBuilder, x: str, divisor: int) -> str:
    return g.op("Div", [g.op("Add", [x, g.ints([divisor - 1])]), g.ints([divisor])])


def _zero_past(g: GraphBuilder, x: str, lengths: str, time_axis: int) -> str:
    """Zero the frames of x at or past each utterance's length (x is [N, F, T] or [T, N, F])."""
    t = g.op("Slice", [g.op("Shape", [x]), g.ints([time_axis]), g.ints([time_axis + 1])])
    steps = g.op(
        "Range",
        [
            g.const(g.fresh("zero"), np.array(0, np.int64)),
            g.op("Squeeze", [t]),
            g.const(g.fresh("one"), np.array(1, np.int64)),
        ],
    )
    if time_axis == 2:
        valid = g.op(
            "Less", [g.op("Unsqueeze", [steps, g.ints([0, 1])]), g.op("Unsqueeze", [lengths, g.ints([1, 2])])]
        )
    else:
        valid = g.op(
            "Less", [g.op("Unsqueeze", [steps, g.ints([1, 2])]), g.op("Unsqueeze", [lengths, g.ints([0, 2])])]
        )
    return g.op("Mul", [x, g.op("Cast", [valid], to=TensorProto.FLOAT)])


def predictor_graph(weights: Weights, model: Mapping, *, layout: str = "bundle") -> onnx.ModelProto:
    """One step of the prediction network; the blank id (the last class) gives the zero start input.

    ``layout="bundle"``: token i64[N], h/c f32[L, N, P] -> predictor_out f32[N, 1, P], h_out, c_out.
    ``layout="sherpa"``: targets i32[N, 1], target_length i32[N], states.1/states.2
    f32[L, N, P] -> decoder_output f32[N, P, 1], decoder_output_length i32[N],
    states.1_out, states.2_out (NeMo's names and order).
    """
    _check_layout(layout)
    layers = int(model["pred_rnn_layers"])
    embed = weights["prediction.embed.weight"].astype(np.float32)
    hidden = embed.shape[1]
    g = GraphBuilder("predictor")
    table = g.const("prediction.embed.table", np.concatenate([embed, np.zeros((1, hidden), np.float32)]))
    if layout == "bundle":
        token = g.input("token", TensorProto.INT64, ["N"])
        h = g.input("h", TensorProto.FLOAT, [layers, "N", hidden])
        c = g.input("c", TensorProto.FLOAT, [layers, "N", hidden])
        ids = token
    else:
        targets = g.input("targets", TensorProto.INT32, ["N", 1])
        target_length = g.input("target_length", TensorProto.INT32, ["N"])
        h = g.input("states.1", TensorProto.FLOAT, [layers, "N", hidden])
        c = g.input("states.2", TensorProto.FLOAT, [layers, "N", hidden])
        ids = g.op("Squeeze", [targets, g.ints([1])])
    x = g.op("Unsqueeze", [g.op("Gather", [table, ids], axis=0), g.ints([0])])  # [1, N, P]
    y, h_n, c_n = g.lstm(x, weights, "prediction.dec_rnn.lstm", layers, h, c)
    if layout == "bundle":
        g.op("Transpose", [y], perm=[1, 0, 2], out=["predictor_out"])
        g.output("predictor_out", TensorProto.FLOAT, ["N", 1, hidden])
        outputs = (("h_out", h_n), ("c_out", c_n))
    else:
        g.op("Transpose", [y], perm=[1, 2, 0], out=["decoder_output"])
        g.output("decoder_output", TensorProto.FLOAT, ["N", hidden, 1])
        g.op("Identity", [target_length], out=["decoder_output_length"])
        g.output("decoder_output_length", TensorProto.INT32, ["N"])
        outputs = (("states.1_out", h_n), ("states.2_out", c_n))
    for name, value in outputs:
        g.op("Identity", [value], out=[name])
        g.output(name, TensorProto.FLOAT, [layers, "N", hidden])
    return g.model()


def joint_graph(weights: Weights, *, layout: str = "bundle") -> onnx.ModelProto:
    """``joint_net(joint_enc(f) + joint_pred(g))`` with ReLU; dropout is off at inference.

    ``layout="bundle"``: encoder_out f32[N, T, H], predictor_out f32[N, 1, P]
    -> logits f32[N, T, n_classes] (every frame against one predictor output).
    ``layout="sherpa"``: encoder_output f32[N, H, 1], decoder_output f32[N, P, 1]
    -> logits f32[N, 1, 1, n_classes].
    """
    _check_layout(layout)
    enc_dim = weights["joint_enc.weight"].shape[1]
    pred_dim = weights["joint_pred.weight"].shape[1]
    n_classes = weights["joint_net.2.weight"].shape[0]
    g = GraphBuilder("joint")
    if layout == "bundle":
        f = g.input("encoder_out", TensorProto.FLOAT, ["N", "T", enc_dim])
        p = g.input("predictor_out", TensorProto.FLOAT, ["N", 1, pred_dim])
    else:
        f = g.op(
            "Transpose", [g.input("encoder_output", TensorProto.FLOAT, ["N", enc_dim, 1])], perm=[0, 2, 1]
        )
        p = g.op(
            "Transpose", [g.input("decoder_output", TensorProto.FLOAT, ["N", pred_dim, 1])], perm=[0, 2, 1]
        )
    hidden = g.op(
        "Relu", [g.op("Add", [g.linear(f, weights, "joint_enc"), g.linear(p, weights, "joint_pred")])]
    )
    logits = g.linear(hidden, weights, "joint_net.2")
    if layout == "bundle":
        g.op("Identity", [logits], out=["logits"])
        g.output("logits", TensorProto.FLOAT, ["N", "T", n_classes])
    else:
        g.op("Unsqueeze", [logits, g.ints([2])], out=["logits"])
        g.output("logits", TensorProto.FLOAT, ["N", 1, 1, n_classes])
    return g.model()
