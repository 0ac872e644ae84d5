"""SALT: singular-value adaptation with a low-rank transformation, written from its definition.

For each adapted weight, in its 2D view ``W`` (``rows x cols``, see ``layers``), the SVD
``W = U diag(s) V^T`` is computed once, when the layer is wrapped (in float64, then stored in the
weight's dtype as non-trainable, non-saved buffers). With ``r`` the number of top singular values,
``P = I - U_r U_r^T`` and ``Q = I - V_r V_r^T`` the projections away from the top singular
vectors, the adapted weight is

    W' = U_r diag(relu(scale * s_r + shift)) V_r^T  +  P W Q  +  (alpha / q) (P B) (A Q)

- ``scale`` and ``shift`` (``r`` each, initialised to 1 and 0) rescale and shift the dominant
  singular values. Only these adapted singular values are kept non-negative (the ``relu``); the
  matrix itself is never clamped.
- ``B A`` (``rows x q`` times ``q x cols``, ``q`` the LoRA rank; ``B`` zero at initialisation) is
  a low-rank update of everything the top singular vectors leave: the remaining singular subspace
  *and* the directions the weight does not use at all. (Format 1 confined it to
  ``span(U_m) x span(V_m)``, the weight's own row space: a convolution's matrix is far wider than
  tall, so the update could follow about 4 % of the training gradient, and SALT learned little.)

The layer computes the *difference* ``dW = W' - W`` from these parameters,

    dW = U_r diag(relu(scale * s_r + shift) - s_r) V_r^T + (alpha / q) (P B) (A Q),

and adds it to the untouched base weight. This is the same ``W'`` (``U diag(s) V^T`` equals ``W``
up to rounding) but with no SVD round-off: at initialisation ``dW`` is exactly zero and the adapted
network reproduces the base network bit for bit.

The SVD is recomputed, not saved, when an adapter file is loaded: adapter files stay small, and
the base weights are checked to be the same (the file carries their identity). Singular vectors
are defined up to sign; a fixed sign convention (the largest-magnitude entry of each left singular
vector is positive) makes the recomputed basis, and so the meaning of ``B`` and ``A``, reproducible.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import nn

from SegAssistLib.learning.adapters.layers import AdaptedLayer, check_alpha, check_rank, weight_to_matrix


def canonical_svd(matrix: torch.Tensor):
    """Thin SVD in float64 with a deterministic sign for each singular pair."""
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs, s, vh * signs[:, None]


class SALTLayer(AdaptedLayer):
    kind = "salt"

    def __init__(
        self,
        base: nn.Module,
        rank: int = 8,
        lora_rank: int = 4,
        alpha: Optional[float] = None,
    ) -> None:
        # checked before the base layer is frozen
        rank = check_rank(rank, "SALT rank (number of top singular values)", 1)
        lora_rank = check_rank(lora_rank, "SALT LoRA rank", 0)
        alpha = check_alpha(alpha, "SALT")
        super().__init__(base)  # refuses a non-finite weight, whose SVD would be a raw torch error
        w = base.weight
        u, s, vh = canonical_svd(weight_to_matrix(base, w))
        rows, cols = u.shape[0], vh.shape[1]
        self.rank = min(rank, s.numel())
        self.lora_rank = min(lora_rank, rows - self.rank, cols - self.rank)  # P B A Q has no more
        self.alpha = alpha if alpha is not None else float(max(self.lora_rank, 1))
        self.scaling = self.alpha / max(self.lora_rank, 1)
        r = self.rank

        def buf(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype=w.dtype, device=w.device).contiguous()

        self.register_buffer("u_top", buf(u[:, :r]), persistent=False)
        self.register_buffer("s_top", buf(s[:r]), persistent=False)
        self.register_buffer("vh_top", buf(vh[:r]), persistent=False)
        self.scale = nn.Parameter(torch.ones(r, dtype=w.dtype, device=w.device))
        self.shift = nn.Parameter(torch.zeros(r, dtype=w.dtype, device=w.device))
        if self.lora_rank > 0:
            q = self.lora_rank
            self.lora_A = nn.Parameter(torch.empty(q, cols, dtype=w.dtype, device=w.device))
            self.lora_B = nn.Parameter(torch.zeros(rows, q, dtype=w.dtype, device=w.device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:  # the top singular vectors span a whole side (e.g. a one-channel output layer)
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)

    def adapted_singular_values(self) -> torch.Tensor:
        """The top singular values as the adapter currently sets them."""
        return torch.relu(self.scale * self.s_top + self.shift)

    def delta_matrix(self) -> torch.Tensor:
        d_top = self.adapted_singular_values() - self.s_top
        delta = (self.u_top * d_top) @ self.vh_top
        if self.lora_A is not None:
            b = self.lora_B - self.u_top @ (self.u_top.T @ self.lora_B)  # P B
            a = self.lora_A - (self.lora_A @ self.vh_top.T) @ self.vh_top  # A Q
            delta = delta + (b @ a) * self.scaling
        return delta

    def hyperparameters(self) -> Dict[str, Any]:
        return {"rank": self.rank, "lora_rank": self.lora_rank, "alpha": self.alpha}
