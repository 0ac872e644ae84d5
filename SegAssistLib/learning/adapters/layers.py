"""The common machinery of adapted layers: a weight seen as a 2D matrix, and a wrapper module.

Why our own implementation rather than ``peft``: ``peft``'s LoRA covers ``Conv3d`` but not
``ConvTranspose3d`` (its LoRA layer dispatch knows Linear, Embedding, Conv1d/2d/3d and
MultiheadAttention), while three of the seven weights of the built-in U-Net are transposed
convolutions, among them the output layer; ``peft`` has no SALT; and installing it pulls
``transformers`` (slower imports, a large dependency for ~200 lines of code here).

Design: an :class:`AdaptedLayer` replaces a layer in its parent module and keeps the original
layer (frozen) as ``base``. Each forward computes ``W + dW`` (``dW`` from the adapter's small
parameters, built in the 2D matrix view of the weight) and runs the *base layer's own* forward
with that weight through :func:`torch.func.functional_call`, so stride, padding, dilation,
``output_size`` and ``output_padding`` behave exactly as in the base layer. For 3D convolutions
the weights are tiny next to the activations, so forming ``dW`` costs far less than the extra
convolutions of the "side branch" formulation, and the conv itself runs once.

Because ``dW`` is exactly zero at initialisation, ``W + dW`` is bitwise ``W`` and an adapted
network reproduces its base exactly. :meth:`AdaptedLayer.merge` writes ``W + dW`` into the base
weight (keeping a copy of ``W`` for :meth:`AdaptedLayer.unmerge`), after which forward is the base
layer's plain forward.

Matrix view: a convolution weight ``(out, in/groups, *k)`` is read as ``out x (in*prod(k))``; a
transposed convolution stores ``(in, out/groups, *k)``, so it is transposed to
``(out, in, *k)`` first. Grouped convolutions are refused (none in the built-in network).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Type

import torch
from torch import nn
from torch.func import functional_call

from SegAssistLib.learning.errors import AdapterError

SUPPORTED_LAYERS: Tuple[Type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYERS) and getattr(module, "groups", 1) == 1


def check_rank(value: Any, what: str, minimum: int) -> int:
    """``value`` as an int; :class:`AdapterError` unless it is a whole number of at least ``minimum``."""
    try:
        whole = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or value < minimum:
        raise AdapterError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_alpha(value: Optional[float], what: str) -> Optional[float]:
    """``value`` as a float (None: the default, the rank); :class:`AdapterError` unless it is positive."""
    if value is None:
        return None
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        alpha = math.nan
    if not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{what} alpha must be a positive number, got {value!r}")
    return alpha


def check_adaptable(module: nn.Module, name: str = "") -> None:
    """:class:`AdapterError` (naming the layer ``name``, when given) unless ``module`` can be adapted:
    a supported layer whose weight is finite (SALT's SVD of NaN is a raw torch error)."""
    layer = f"layer {name!r} ({type(module).__name__})" if name else f"a {type(module).__name__}"
    if not is_supported(module):
        groups = getattr(module, "groups", 1)
        why = f", a grouped convolution (groups={groups})" if groups != 1 else ""
        raise AdapterError(f"cannot adapt {layer}{why}: supported are Linear and (transposed) convolutions")
    if not torch.isfinite(module.weight).all():
        raise AdapterError(f"cannot adapt {layer}: its weight holds NaN or infinite values")


def matrix_shape(module: nn.Module) -> Tuple[int, int]:
    """``(rows, cols)`` of the weight's 2D view: ``(out, in * prod(kernel))``."""
    w = module.weight
    if isinstance(module, _TRANSPOSED):
        return int(w.shape[1]), int(w.shape[0] * w[0, 0].numel())
    return int(w.shape[0]), int(w[0].numel())


def weight_to_matrix(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, _TRANSPOSED):
        weight = weight.transpose(0, 1)
    return weight.reshape(weight.shape[0], -1)


def matrix_to_weight(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    shape = module.weight.shape
    if isinstance(module, _TRANSPOSED):
        return matrix.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    return matrix.reshape(shape)


class AdaptedLayer(nn.Module):
    """A frozen base layer plus a trainable weight update ``dW`` (see the module docstring).

    Subclasses register their trainable parameters directly on themselves (not on ``base``) and
    implement :meth:`delta_matrix`. They check their own settings before calling this constructor,
    which freezes the base layer's parameters once the layer is known to be adaptable.
    """

    kind = "base"

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        check_adaptable(base)
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.rows, self.cols = matrix_shape(base)
        # The original weight while merged; a buffer so that .to(device) moves it, not saved.
        self.register_buffer("_merged_from", None, persistent=False)

    # --- to implement -------------------------------------------------------------------------
    def delta_matrix(self) -> torch.Tensor:
        """The update of the weight's 2D view, ``rows x cols``."""
        raise NotImplementedError

    def hyperparameters(self) -> Dict[str, Any]:
        """What, beside the base layer, is needed to rebuild this layer (saved in adapter files)."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return self._merged_from is not None

    def delta_weight(self) -> torch.Tensor:
        return matrix_to_weight(self.base, self.delta_matrix()).to(self.base.weight.dtype)

    def adapter_parameters(self) -> Dict[str, nn.Parameter]:
        return dict(self.named_parameters(recurse=False))

    def original_weight(self) -> torch.Tensor:
        """The base weight as it was before any merge."""
        return self._merged_from if self._merged_from is not None else self.base.weight.detach()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base(x, *args, **kwargs)
        weight = self.base.weight + self.delta_weight()
        return functional_call(self.base, {"weight": weight}, (x, *args), kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``dW`` into the base weight: forward then costs what the base layer costs."""
        if self.merged:
            return
        original = self.base.weight.detach().clone()
        self.base.weight.copy_(original + self.delta_weight())
        self._merged_from = original

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original base weight (a copy was kept at merge time)."""
        if self._merged_from is None:
            return
        self.base.weight.copy_(self._merged_from)
        self._merged_from = None

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"kind={self.kind}, {hp}, merged={self.merged}"
