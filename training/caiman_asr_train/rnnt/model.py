"""The training RNNT: the core model plus optimiser groups, encoder freezing and the loss.

Built from ``config.rnnt(cfg)`` kwargs through ``ConfigRNNT``, so its state dict
is exactly the core model's. The transducer joint and loss use NVIDIA apex's
fused CUDA kernels when apex is importable and the model is on a GPU, and plain
PyTorch otherwise.
"""

from typing import Any, Optional

import torch
from torch import Tensor

from caiman_asr_train.core.model import RNNT as CoreRNNT
from caiman_asr_train.core.model import ConfigRNNT, TorchConfig
from caiman_asr_train.rnnt.loss import rnnt_loss

SHAPE_KEYS = (
    "in_feats",
    "enc_n_hid",
    "enc_pre_rnn_layers",
    "enc_post_rnn_layers",
    "enc_stack_time_factor",
    "pred_n_hid",
    "pred_rnn_layers",
    "joint_n_hid",
    "enc_dropout",
    "pred_dropout",
    "joint_dropout",
    "forget_gate_bias",
    "hidden_hidden_bias_scale",
    "weights_init_scale",
)
GROUP_LR_FACTORS = {
    "encoder": "enc_lr_factor",
    "prediction": "pred_lr_factor",
    "joint_enc": "joint_enc_lr_factor",
    "joint_pred": "joint_pred_lr_factor",
    "joint_net": "joint_net_lr_factor",
}


def _apex_transducer():
    try:
        from apex.contrib.transducer import TransducerJoint, TransducerLoss
    except ImportError:
        return None
    return TransducerJoint, TransducerLoss


def config_rnnt(n_classes: int, **kwargs: Any) -> ConfigRNNT:
    """The ``ConfigRNNT`` for ``config.rnnt(cfg)`` kwargs (training-only keys ignored)."""
    prefix_token_map = {
        str(k): [int(t) for t in v] for k, v in (kwargs.get("prefix_token_map") or {}).items()
    }
    return ConfigRNNT(
        n_classes=n_classes,
        lstm=TorchConfig(),
        prefix_token_map=prefix_token_map,
        **{key: kwargs[key] for key in SHAPE_KEYS if key in kwargs},
    )


class RNNT(CoreRNNT):
    """Training RNN-T. ``RNNT(n_classes, **config.rnnt(cfg))``."""

    def __init__(self, n_classes: int, **kwargs: Any):
        super().__init__(config_rnnt(n_classes, **kwargs))
        self.lr_factors = {group: float(kwargs.get(key, 1.0)) for group, key in GROUP_LR_FACTORS.items()}
        self.joint_apex_transducer: Optional[str] = kwargs.get("joint_apex_transducer")
        self.joint_apex_relu_dropout = bool(kwargs.get("joint_apex_relu_dropout", False))
        if kwargs.get("enc_freeze", False):
            self.encoder.requires_grad_(False)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser groups (encoder, prediction, joint_enc, joint_pred, joint_net), lr times each factor."""
        return [
            {
                "name": group,
                "params": [p for p in getattr(self, group).parameters() if p.requires_grad],
                "lr": lr * factor,
                "lr_factor": factor,
            }
            for group, factor in self.lr_factors.items()
        ]

    def loss(self, x: Tensor, x_lens: Tensor, y: Tensor, y_lens: Tensor) -> Tensor:
        """Mean transducer loss of a batch.

        x[T, B, in_feats] spliced features, x_lens[B] frames, y[B, U] label ids
        (padding any id < blank), y_lens[B].
        """
        f, f_lens, _ = self.encode(x, x_lens)
        g, _ = self.predict(y)
        apex = _apex_transducer() if self.joint_apex_transducer and f.is_cuda else None
        if apex is not None:
            return self._apex_loss(apex, f, f_lens, g, y, y_lens)
        logits = self.joint(f, g)
        return rnnt_loss(logits, f_lens, y, y_lens, blank_idx=self.config.blank_idx, reduction="mean")

    def _apex_loss(self, apex, f: Tensor, f_lens: Tensor, g: Tensor, y: Tensor, y_lens: Tensor) -> Tensor:
        TransducerJoint, TransducerLoss = apex
        pack = self.joint_apex_transducer == "pack"
        relu_dropout = self.joint_apex_relu_dropout and self.training
        joint = TransducerJoint(
            pack_output=pack,
            relu=relu_dropout,
            dropout=relu_dropout,
            dropout_prob=self.joint_net[1].p,
        )
        g_lens = y_lens + 1
        batch_offset = torch.cumsum(f_lens * g_lens, dim=0) if pack else None
        h = joint(
            self.joint_enc(f),
            self.joint_pred(g),
            f_lens,
            g_lens,
            batch_offset,
            int(batch_offset[-1]) if pack else 0,
        )
        logits = self.joint_net[2](h) if relu_dropout else self.joint_net(h)
        losses = TransducerLoss(packed_input=pack)(
            logits.float(),
            y.int(),
            f_lens.int(),
            y_lens.int(),
            self.config.blank_idx,
            batch_offset=batch_offset,
            max_f_len=int(f_lens.max()),
        )
        return losses.mean()
