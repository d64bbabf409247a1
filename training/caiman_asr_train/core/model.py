"""The RNN-Transducer: one shape definition (``ConfigRNNT``) and one module (``RNNT``).

State-dict names, order and shapes are the contract with the inference server
(docs/formats.md section 5). Tensor layouts (B batch, T frames, U labels, F features):

    encode(x[T, B, F], x_lens[B])          -> f[B, T', H], f_lens[B], state
    predict(y[B, U])                       -> g[B, U+1, P], state   (zero start input first)
    joint(f[B, T', H], g[B, U+1, P])       -> logits[B, T', U+1, n_classes]

The blank symbol is the last class, ``n_classes - 1``; the prediction network's
embedding has no row for it.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

LSTMState = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class TorchConfig:
    """LSTM backend: plain ``torch.nn.LSTM`` (what inference and CPU training use)."""


@dataclass(frozen=True)
class ConfigRNNT:
    """Everything that fixes the model's shape and initialisation."""

    n_classes: int
    in_feats: int
    enc_n_hid: int
    enc_pre_rnn_layers: int
    enc_post_rnn_layers: int
    enc_stack_time_factor: int
    pred_n_hid: int
    pred_rnn_layers: int
    joint_n_hid: int
    enc_dropout: float = 0.0
    pred_dropout: float = 0.0
    joint_dropout: float = 0.0
    forget_gate_bias: float = 1.0
    hidden_hidden_bias_scale: float = 0.0
    weights_init_scale: float = 1.0
    lstm: TorchConfig = field(default_factory=TorchConfig)
    # prefix tag -> token ids the prediction network consumes before decoding
    prefix_token_map: dict[str, list[int]] = field(default_factory=dict)

    @property
    def blank_idx(self) -> int:
        return self.n_classes - 1


class LSTM(nn.Module):
    """``nn.LSTM`` (time-major) with dropout between layers and on its output.

    Initialisation: PyTorch defaults; LSTM weights and biases times
    ``weights_init_scale``; each ``bias_ih`` forget-gate slice set to
    ``forget_gate_bias`` and each ``bias_hh`` forget slice times
    ``hidden_hidden_bias_scale``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        forget_gate_bias: float,
        hidden_hidden_bias_scale: float,
        weights_init_scale: float,
    ):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            for name, param in self.lstm.named_parameters():
                param.mul_(weights_init_scale)
                if name.startswith("bias_ih"):
                    param[hidden_size : 2 * hidden_size].fill_(forget_gate_bias)
                elif name.startswith("bias_hh"):
                    param[hidden_size : 2 * hidden_size].mul_(hidden_hidden_bias_scale)

    def forward(self, x: Tensor, state: Optional[LSTMState] = None) -> tuple[Tensor, LSTMState]:
        """x[T, B, in] -> (y[T, B, hidden], (h, c) each [layers, B, hidden])."""
        y, state = self.lstm(x, state)
        return self.dropout(y), state


class StackTime(nn.Module):
    """Concatenate each frame with its next ``factor - 1`` frames and keep every ``factor``-th.

    x[T, B, F] -> y[ceil(T / factor), B, factor * F]. Frames past each
    utterance's own length are zeros, so an utterance gives the same output
    whatever it is batched with.
    """

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor, x_lens: Tensor) -> tuple[Tensor, Tensor]:
        T, B, F = x.shape
        valid = torch.arange(T, device=x.device)[:, None] < x_lens.to(x.device)[None, :]
        x = x * valid.unsqueeze(-1).to(x.dtype)
        pad = (-T) % self.factor
        if pad:
            x = torch.cat([x, x.new_zeros(pad, B, F)])
        x = x.view(-1, self.factor, B, F).transpose(1, 2).reshape(-1, B, self.factor * F)
        return x, torch.div(x_lens + self.factor - 1, self.factor, rounding_mode="floor")


class Encoder(nn.Module):
    """pre_rnn -> stack_time -> post_rnn."""

    def __init__(self, c: ConfigRNNT):
        super().__init__()
        lstm_init = dict(
            dropout=c.enc_dropout,
            forget_gate_bias=c.forget_gate_bias,
            hidden_hidden_bias_scale=c.hidden_hidden_bias_scale,
            weights_init_scale=c.weights_init_scale,
        )
        self.pre_rnn = LSTM(c.in_feats, c.enc_n_hid, c.enc_pre_rnn_layers, **lstm_init)
        self.stack_time = StackTime(c.enc_stack_time_factor)
        self.post_rnn = LSTM(
            c.enc_stack_time_factor * c.enc_n_hid, c.enc_n_hid, c.enc_post_rnn_layers, **lstm_init
        )


class Prediction(nn.Module):
    """Embedding of the previous label (no row for blank) followed by an LSTM."""

    def __init__(self, c: ConfigRNNT):
        super().__init__()
        self.embed = nn.Embedding(c.n_classes - 1, c.pred_n_hid)
        self.dec_rnn = LSTM(
            c.pred_n_hid,
            c.pred_n_hid,
            c.pred_rnn_layers,
            dropout=c.pred_dropout,
            forget_gate_bias=c.forget_gate_bias,
            hidden_hidden_bias_scale=c.hidden_hidden_bias_scale,
            weights_init_scale=c.weights_init_scale,
        )


class RNNT(nn.Module):
    """RNN-Transducer built from a ``ConfigRNNT``; see the module docstring for layouts."""

    def __init__(self, config: ConfigRNNT):
        super().__init__()
        if not isinstance(config.lstm, TorchConfig):
            raise TypeError(f"unsupported LSTM backend {config.lstm!r}; core builds TorchConfig() models")
        self.config = config
        # Registration order is the state-dict order the inference server expects.
        self.encoder = Encoder(config)
        self.prediction = Prediction(config)
        self.joint_pred = nn.Linear(config.pred_n_hid, config.joint_n_hid)
        self.joint_enc = nn.Linear(config.enc_n_hid, config.joint_n_hid)
        self.joint_net = nn.Sequential(
            nn.ReLU(),
            nn.Dropout(config.joint_dropout),
            nn.Linear(config.joint_n_hid, config.n_classes),
        )

    def encode(
        self, x: Tensor, x_lens: Tensor, state: Optional[tuple[LSTMState, LSTMState]] = None
    ) -> tuple[Tensor, Tensor, tuple[LSTMState, LSTMState]]:
        """Encode spliced features.

        x[T, B, in_feats], x_lens[B] (frames) -> f[B, T', enc_n_hid], f_lens[B] with
        T' = ceil(T / enc_stack_time_factor), and the LSTM states (pre, post).
        Passing the returned state back with the next chunk continues the stream:
        chunks whose lengths are multiples of ``enc_stack_time_factor`` give the
        same outputs as the whole utterance.
        """
        pre_state, post_state = state if state is not None else (None, None)
        h, pre_state = self.encoder.pre_rnn(x, pre_state)
        h, f_lens = self.encoder.stack_time(h, x_lens)
        h, post_state = self.encoder.post_rnn(h, post_state)
        return h.transpose(0, 1), f_lens, (pre_state, post_state)

    def predict(
        self, y: Optional[Tensor], state: Optional[LSTMState] = None, add_sos: bool = True
    ) -> tuple[Tensor, LSTMState]:
        """Run the prediction network over label ids.

        y[B, U] (ids < n_classes - 1; a negative id stands for the all-zero start
        input) -> g[B, U+1, pred_n_hid] with the start input prepended when
        ``add_sos``, else g[B, U, pred_n_hid]. ``y=None`` means the start input
        alone for a batch of one (or of the state's batch size).
        """
        if y is None:
            batch = 1 if state is None else state[0].shape[1]
            y = torch.full((batch, 1), -1, dtype=torch.long, device=self.joint_pred.weight.device)
            add_sos = False
        emb = self.prediction.embed(y.clamp(min=0)) * (y >= 0).unsqueeze(-1).to(self.joint_pred.weight.dtype)
        if add_sos:
            emb = torch.cat([emb.new_zeros(emb.shape[0], 1, emb.shape[2]), emb], dim=1)
        g, state = self.prediction.dec_rnn(emb.transpose(0, 1), state)
        return g.transpose(0, 1), state

    def joint(self, f: Tensor, g: Tensor) -> Tensor:
        """f[B, T', enc_n_hid], g[B, U+1, pred_n_hid] -> logits[B, T', U+1, n_classes]."""
        return self.joint_net(self.joint_enc(f)[:, :, None, :] + self.joint_pred(g)[:, None, :, :])

    def forward(self, x: Tensor, x_lens: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """x[T, B, in_feats], x_lens[B], y[B, U] -> (logits[B, T', U+1, n_classes], f_lens[B])."""
        f, f_lens, _ = self.encode(x, x_lens)
        g, _ = self.predict(y)
        return self.joint(f, g), f_lens
