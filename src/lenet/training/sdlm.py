"""Stochastic diagonal Levenberg-Marquardt (SDLM), the optimizer LeNet-5 was trained with
(LeCun et al. 1998, appendix C; LeCun, Bottou, Orr, Mueller, *Efficient BackProp*, 1998).

Each parameter w_k gets its own step size  eta_k = lr / (mu + h_kk), where h_kk is a running
estimate of the diagonal of the Gauss-Newton approximation of the Hessian of the loss. As in the
paper, h_kk is re-estimated on a few hundred training patterns before each pass and then held fixed
for the pass (:meth:`SDLM.prepare_epoch`, called by the training loop), with mu = 0.02.

How h_kk is estimated here: the paper back-propagates second derivatives with squared weights.
We compute the same Gauss-Newton quantity, sum over outputs of (d out / d w_k)^2 times the
loss's curvature in that output, with a random-sign backward pass: for signs v in {-1, +1},
E[(J^T v)_k^2] = sum_o J_ok^2, so one backward pass per chunk of patterns gives an unbiased
estimate of the whole diagonal (cross terms between patterns and outputs average out).

The outputs are the model's ``curvature_outputs(x)`` (LeNet-5: the F6 units, where the correct
class's RBF penalty is a squared error, curvature 2 per unit, as in the paper), or its scores.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .._util import eval_mode


class SDLM(torch.optim.Optimizer):
    """Per-parameter step lr / (mu + h_kk) on the gradient (see the module docstring)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 5e-4, mu: float = 0.02,
                 output_curvature: float = 2.0, weight_decay: float = 0.0):
        if lr <= 0 or mu <= 0:
            raise ValueError(f"SDLM needs lr > 0 and mu > 0, got lr={lr}, mu={mu}")
        super().__init__(params, dict(lr=lr, mu=mu, weight_decay=weight_decay))
        self.output_curvature = output_curvature
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["h"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                p.addcdiv_(grad, self.state[p]["h"] + group["mu"], value=-group["lr"])
        return loss

    def prepare_epoch(self, model: nn.Module, images: torch.Tensor, chunk: int = 100) -> None:
        """Re-estimate h_kk as the average Gauss-Newton diagonal over ``images`` (float N,1,H,W)."""
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        sums = [torch.zeros_like(p) for p in params]
        outputs_of = getattr(model, "curvature_outputs", None) or model
        with eval_mode(model):  # the curvature of the network as it is, without dropout noise
            for start in range(0, images.shape[0], chunk):
                out = outputs_of(images[start:start + chunk])
                signs = torch.randint(0, 2, out.shape, device=out.device).to(out.dtype) * 2 - 1
                grads = torch.autograd.grad((out * signs).sum(), params, allow_unused=True)
                for s, g in zip(sums, grads):
                    if g is not None:
                        s.add_(g.square())
        n = max(images.shape[0], 1)
        for p, s in zip(params, sums):
            self.state[p]["h"] = s.mul_(self.output_curvature / n)
