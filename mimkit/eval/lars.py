"""LARS, the optimiser of MAE's linear probe (You et al. 2017, as in MoCo v3 and MAE's ``util/lars.py``).

For every parameter with more than one dimension (weight matrices; biases and normalisation
scales are exempt from both the weight decay and the trust ratio)::

    g <- g + wd * w
    q  = eta * ||w|| / ||g||      (1 where either norm is zero)
    g <- q * g

and then for every parameter ``mu <- momentum * mu + g``, ``w <- w - lr * mu``. The momentum
buffer starts at zero, so the first step moves ``w`` by ``lr * q * g``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with heavy-ball momentum (MAE's linear-probe optimiser).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (MAE's probe: 0.1 x effective batch / 256).
        weight_decay: L2 added to the gradient of >1-D parameters (MAE's probe: 0).
        momentum: heavy-ball momentum, no dampening, no Nesterov.
        trust_coefficient: eta of the trust ratio ``eta * ||w|| / ||g||``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)):
            if value < 0:
                raise ValueError(f"LARS {name}={value} must be non-negative")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS trust_coefficient={trust_coefficient} must be positive")
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    one = torch.ones_like(w_norm)
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm, one
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss
