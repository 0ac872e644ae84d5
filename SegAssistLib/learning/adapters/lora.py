"""LoRA (low-rank adaptation) for linear and (transposed) convolution layers.

In the weight's 2D view ``W`` (``out x in*prod(k)``, see ``layers``), the update is
``dW = (alpha / r) * B @ A`` with ``A`` (``r x cols``) random and ``B`` (``rows x r``) zero at
initialisation, so the adapted layer starts as the base layer exactly.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import nn

from SegAssistLib.learning.adapters.layers import AdaptedLayer, check_alpha, check_rank


class LoRALayer(AdaptedLayer):
    kind = "lora"

    def __init__(self, base: nn.Module, rank: int = 4, alpha: Optional[float] = None) -> None:
        rank = check_rank(rank, "LoRA rank", 1)  # checked before the base layer is frozen
        alpha = check_alpha(alpha, "LoRA")
        super().__init__(base)
        self.rank = min(rank, self.rows, self.cols)
        self.alpha = alpha if alpha is not None else float(self.rank)
        self.scaling = self.alpha / self.rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.cols, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.rows, self.rank, dtype=w.dtype, device=w.device))
        # A like a linear layer's default init (fan-in scaled), B zero: dW starts at exactly 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_matrix(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def hyperparameters(self) -> Dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha}
