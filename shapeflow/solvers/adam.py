"""Adam on a list of tensors, in a handful of fused (`foreach`) operations per step.

The update is `torch.optim.Adam`'s (Kingma & Ba, bias-corrected, eps added to the corrected
second moment's square root), so a fit takes the same steps as with it; two reasons to have our
own: `torch.optim.Optimizer` imports `torch._dynamo` on its first use (0.7 s of every process's
first registration on this CPU), and its per-step bookkeeping costs more than the update itself
on the small flows of a 100-point shape.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["Adam"]


class Adam:
    """Adam over `params` (tensors with `requires_grad`), learning rate `lr`.

    `zero_grad()` clears the gradients, `step()` applies one update from the current `.grad`s;
    a parameter without a gradient is left alone, and its moments are not advanced (as torch's).
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = list(params)
        if not lr > 0:
            raise ValueError(f"Adam: lr must be > 0, got {lr!r}")
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.first = [torch.zeros_like(p) for p in self.params]
        self.second = [torch.zeros_like(p) for p in self.params]
        self.steps = [0] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        beta1, beta2 = self.betas
        # parameters with the same step count share the bias corrections: one fused update per group
        groups: dict[int, list[int]] = {}
        for i in live:
            groups.setdefault(self.steps[i] + 1, []).append(i)
        for count, group in groups.items():
            params = [self.params[i] for i in group]
            grads = [self.params[i].grad for i in group]
            first = [self.first[i] for i in group]
            second = [self.second[i] for i in group]
            torch._foreach_lerp_(first, grads, 1 - beta1)
            torch._foreach_mul_(second, beta2)
            torch._foreach_addcmul_(second, grads, grads, 1 - beta2)
            denominator = torch._foreach_sqrt(second)
            torch._foreach_div_(denominator, math.sqrt(1 - beta2 ** count))
            torch._foreach_add_(denominator, self.eps)
            torch._foreach_addcdiv_(params, first, denominator, -self.lr / (1 - beta1 ** count))
            for i in group:
                self.steps[i] = count
