"""The plain-PyTorch LAMB against a hand computation of the FusedLAMB update."""

import math

import pytest
import torch

from caiman_asr_train.train_utils.optim import Lamb, build_optimizer


def reference_lamb(p, grads, lr, betas, eps, wd):
    """Two LAMB steps written out with Python floats, element by element."""
    p = [float(x) for x in p]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        g = [float(x) for x in g]
        m = [betas[0] * mi + (1 - betas[0]) * gi for mi, gi in zip(m, g)]
        v = [betas[1] * vi + (1 - betas[1]) * gi * gi for vi, gi in zip(v, g)]
        u = [
            (mi / (1 - betas[0] ** t)) / (math.sqrt(vi / (1 - betas[1] ** t)) + eps) + wd * pi
            for mi, vi, pi in zip(m, v, p)
        ]
        w_norm = math.sqrt(sum(x * x for x in p))
        u_norm = math.sqrt(sum(x * x for x in u))
        ratio = w_norm / u_norm if wd and w_norm > 0 and u_norm > 0 else 1.0
        p = [pi - lr * ratio * ui for pi, ui in zip(p, u)]
    return p


def test_lamb_matches_the_written_out_update():
    torch.manual_seed(0)
    start = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(2)]
    for wd in (0.01, 0.0):
        param = torch.nn.Parameter(start.clone())
        opt = Lamb([param], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd)
        for g in grads:
            param.grad = g.clone()
            opt.step()
        expected = reference_lamb(start.tolist(), [g.tolist() for g in grads], 0.1, (0.9, 0.99), 1e-6, wd)
        torch.testing.assert_close(param.detach(), torch.tensor(expected, dtype=torch.float64))


def test_trust_ratio_makes_the_step_proportional_to_the_weight_norm():
    # With weight decay the relative change of a tensor is lr whatever its scale.
    for scale in (1e-3, 1.0, 1e3):
        param = torch.nn.Parameter(torch.full((4,), scale))
        opt = Lamb([param], lr=0.01, weight_decay=0.01)
        param.grad = torch.ones(4)
        before = param.detach().clone()
        opt.step()
        assert abs(float((param.detach() - before).norm() / before.norm()) - 0.01) < 1e-5


@pytest.mark.parametrize("name, cls", [("lamb", Lamb), ("adamw", torch.optim.AdamW)])
def test_state_dict_round_trip_on_cpu(name, cls):
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(
        [{"params": list(model.parameters()), "lr": 0.1}], name, 0.1, 0.01, torch.device("cpu")
    )
    assert type(opt) is cls
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    clone = build_optimizer(
        [{"params": list(model.parameters()), "lr": 0.1}], name, 0.1, 0.01, torch.device("cpu")
    )
    clone.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(clone.state[p][key], opt.state[p][key])
