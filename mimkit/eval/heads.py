"""Linear heads of the probes and how they read frozen features.

MAE's head (He et al. 2022) is ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear``, weight
truncated normal std 0.01 (MoCo v3's), bias 0; DINOv2's (Oquab et al. 2023) is a plain ``Linear``,
weight N(0, 0.01), bias 0, on the concatenated cls tokens of the last n blocks and, optionally,
the mean patch token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """Optional ``BatchNorm1d(dim, affine=False, eps=1e-6)``, then ``Linear(dim, num_classes)``.

    ``init="trunc_normal"`` is MAE's (MoCo v3's) truncated normal, ``"normal"`` DINOv2's; both std
    0.01, bias 0. The BatchNorm has no parameters: it re-parameterises the linear layer.
    """

    def __init__(self, dim: int, num_classes: int, batchnorm: bool, init: str = "normal"):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.linear = nn.Linear(dim, num_classes)
        if init == "trunc_normal":
            nn.init.trunc_normal_(self.linear.weight, std=0.01)
        else:
            nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> logits (B, num_classes)."""
        return self.linear(self.norm(x))


def head_input(feats: dict[str, torch.Tensor], n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """DINOv2's head input: cls tokens of the last n blocks (oldest first), then the patch mean."""
    x = feats["last_cls"][:, -n_last_blocks:].flatten(1)
    return torch.cat([x, feats["patch_mean"]], dim=1) if avgpool else x


@torch.no_grad()
def score_head(
    head: nn.Module, x: torch.Tensor, labels: torch.Tensor, chunk: int = 4096
) -> tuple[float, float]:
    """Top-1 (%) and mean cross-entropy of ``head`` in eval mode."""
    head.eval()
    device = next(head.parameters()).device
    correct, loss = 0, 0.0
    for i in range(0, len(x), chunk):
        logits = head(x[i : i + chunk].to(device)).float().cpu()
        target = labels[i : i + chunk].cpu()
        correct += int((logits.argmax(1) == target).sum())
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
    n = max(len(x), 1)
    return 100.0 * correct / n, loss / n


def top1(head: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 (%) of ``head`` in eval mode."""
    return score_head(head, x, labels)[0]
