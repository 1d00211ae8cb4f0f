"""The SDLM optimizer and the paper's per-pass step sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lenet.models import create_model
from lenet.training.sdlm import SDLM
from lenet.training import LECUN_PASSES, TrainConfig, make_optimizer, make_schedule


class Tiny(nn.Module):
    """A small two-layer network whose exact Gauss-Newton diagonal is cheap to compute."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def curvature_outputs(self, x):
        return torch.tanh(self.b(torch.tanh(self.a(x))))

    forward = curvature_outputs


def exact_gauss_newton_diagonal(model, images):
    """2 * mean over patterns of sum over outputs of (d out / d w)^2, one backward per output."""
    params = list(model.parameters())
    sums = [torch.zeros_like(p) for p in params]
    for x in images:
        out = model.curvature_outputs(x[None])[0]
        for u in range(out.shape[0]):
            for s, g in zip(sums, torch.autograd.grad(out[u], params, retain_graph=True)):
                s += g.square()
    return [2 * s / len(images) for s in sums]


def test_curvature_estimate_is_the_gauss_newton_diagonal():
    torch.manual_seed(0)
    model = Tiny()
    images = torch.randn(6, 5)
    exact = exact_gauss_newton_diagonal(model, images)
    opt = SDLM(model.parameters())
    estimates = [torch.zeros_like(p) for p in model.parameters()]
    repeats = 2000  # independent random-sign draws
    for _ in range(repeats):
        opt.prepare_epoch(model, images)
        for e, p in zip(estimates, model.parameters()):
            e += opt.state[p]["h"] / repeats
    for (name, _), e, x in zip(model.named_parameters(), estimates, exact):
        assert torch.allclose(e, x, rtol=0.15, atol=1e-3 * x.max().item()), name


def test_lenet5_curvature_reaches_every_parameter():
    torch.manual_seed(0)
    model = create_model("lenet5")
    opt = SDLM(model.parameters())
    opt.prepare_epoch(model, torch.rand(20, 1, 28, 28))
    for name, p in model.named_parameters():
        h = opt.state[p]["h"]
        assert torch.isfinite(h).all() and (h >= 0).all() and h.sum() > 0, name
    assert model.training  # left as it was


def test_sdlm_step_is_lr_over_mu_plus_curvature():
    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = SDLM([w], lr=0.1, mu=0.5)
    opt.state[w]["h"] = torch.tensor([0.0, 1.5])
    w.grad = torch.tensor([1.0, 1.0])
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([1 - 0.1 / 0.5, 1 - 0.1 / 2.0]))


def test_sdlm_per_pattern_training_lowers_the_papers_loss():
    torch.manual_seed(0)
    model = create_model("lenet5")
    x = torch.zeros(32, 1, 28, 28)
    labels = torch.arange(32) % 2
    x[labels == 0, :, 4:24, 12:16] = 1.0  # a bar
    x[labels == 1, :, 12:16, 4:24] = 1.0  # a dash
    opt = make_optimizer(TrainConfig(optimizer="sdlm", lr=5e-5), model.parameters())
    opt.prepare_epoch(model, x)
    first = model.criterion(model(x), labels).item()
    for _ in range(3):
        for i in range(32):
            loss = model.criterion(model(x[i:i + 1]), labels[i:i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert model.criterion(model(x), labels).item() < 0.7 * first


def test_lecun_schedule_follows_the_papers_passes():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=5e-4)
    sched = make_schedule(TrainConfig(epochs=20, schedule="lecun"), opt, steps_per_epoch=3)
    rates = []
    for _ in range(20):
        rates.append(opt.param_groups[0]["lr"])
        for _ in range(3):
            opt.step()
            sched.step()
    expected = [5e-4] * 2 + [2e-4] * 3 + [1e-4] * 3 + [5e-5] * 4 + [1e-5] * 8
    assert rates == pytest.approx(expected)
    assert len(LECUN_PASSES) == 12


def test_training_loop_runs_sdlm_the_papers_way():
    from lenet.data import synthetic_dataset
    from lenet.training import train

    cfg = TrainConfig.for_model("lenet5", epochs=2, optimizer="sdlm", lr=5e-5, batch_size=1, schedule="lecun")
    result = train(cfg, data=synthetic_dataset(n_train=48, n_test=16))
    assert len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(m.train_loss)) for m in result.history)
