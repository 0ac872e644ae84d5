"""Applying adapters to a network, and adapter files.

:func:`apply_adapter` wraps the chosen layers of a network in place, freezes every base parameter
and returns an :class:`AdapterSet`: the handle to train (its ``parameters()``), count, merge,
save and remove the adapter.

An adapter file is a ``torch.save`` dict loadable with ``weights_only=True``::

    {"format": "segassist-adapter", "format_version": 2, "kind": "lora" | "salt",
     "config": {...AdapterConfig...}, "base_identity": "<16 hex>",
     "state": {"<layer>.<parameter>": tensor, ...}, "meta": {...JSON-compatible...}}

``base_identity`` is :func:`SegAssistLib.engine.network.weights_identity` of the base weights
(the same value as ``LoadedModel.identity``); :func:`load_adapter` refuses a file made for other
base weights, since an adapter is meaningless (and SALT's singular basis wrong) on another base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from SegAssistLib.engine.network import load_tagged_file, weights_identity
from SegAssistLib.files import atomic_write, plain_data
from SegAssistLib.learning.adapters.layers import AdaptedLayer, check_adaptable, check_alpha, check_rank, is_supported
from SegAssistLib.learning.adapters.lora import LoRALayer
from SegAssistLib.learning.adapters.salt import SALTLayer
from SegAssistLib.learning.errors import AdapterError

ADAPTER_FORMAT = "segassist-adapter"
ADAPTER_FORMAT_VERSION = 2  # 2: SALT's low-rank update spans the whole weight (format 1 SALT files are refused)
DEFAULT_LORA_RANK = 4
DEFAULT_SALT_RANK = 8
DEFAULT_SALT_LORA_RANK = 4

Targets = Union[None, Sequence[str], Callable[[str, nn.Module], bool]]


class AdapterKind(str, Enum):
    LORA = "lora"
    SALT = "salt"

    @classmethod
    def parse(cls, value: Union[str, AdapterKind]) -> AdapterKind:
        try:
            return cls(str(value.value if isinstance(value, AdapterKind) else value).lower())
        except ValueError:
            raise AdapterError(f"unknown adapter kind {value!r} (known: lora, salt)") from None


@dataclass(frozen=True)
class AdapterConfig:
    """How an adapter was built. ``rank``: LoRA rank, or for SALT the number of top singular values;
    ``lora_rank``: rank of SALT's low-rank update beside the top singular values (0 for LoRA)."""

    kind: AdapterKind
    rank: int
    lora_rank: int = 0
    alpha: Optional[float] = None
    targets: Tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["kind"] = self.kind.value
        out["targets"] = list(self.targets)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> AdapterConfig:
        if not isinstance(data, dict):
            raise AdapterError(f"invalid adapter config {data!r}: not an object of settings")
        targets = data.get("targets", ())
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            # a string would be taken letter by letter: "no layer named 'm'"
            raise AdapterError(f"invalid adapter config: its targets must be a list of layer names, got {targets!r}")
        try:
            return cls(
                kind=AdapterKind.parse(data["kind"]),
                rank=int(data["rank"]),
                lora_rank=int(data.get("lora_rank", 0)),
                alpha=None if data.get("alpha") is None else float(data["alpha"]),
                targets=tuple(targets),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise AdapterError(f"invalid adapter config {data!r}: {exc}") from exc


def _adapted_layers(network: nn.Module) -> Dict[str, AdaptedLayer]:
    return {name: m for name, m in network.named_modules() if isinstance(m, AdaptedLayer)}


def base_state_dict(network: nn.Module) -> Dict[str, torch.Tensor]:
    """The network's state dict as its base model had it: original keys, un-merged weights,
    no adapter parameters. Works on plain and adapted networks alike."""
    layers = _adapted_layers(network)
    out: Dict[str, torch.Tensor] = {}
    for key, value in network.state_dict().items():
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1 :]
        if not rest.startswith("base."):
            continue  # an adapter parameter
        rest = rest[len("base.") :]
        if rest == "weight":
            value = layers[owner].original_weight()
        out[f"{owner}.{rest}"] = value
    return out


def base_identity(network: nn.Module) -> str:
    """``weights_identity`` of the base weights, whether or not adapters are applied or merged."""
    return weights_identity(base_state_dict(network))


def _select_targets(network: nn.Module, targets: Targets) -> List[str]:
    candidates = {name: m for name, m in network.named_modules() if name and is_supported(m)}
    if targets is None:
        chosen = list(candidates)
    elif callable(targets):
        chosen = [n for n, m in candidates.items() if targets(n, m)]
    else:
        names = list(targets)
        modules = dict(network.named_modules())
        for name in names:
            if name not in modules:
                raise AdapterError(f"the network has no layer named {name!r}")
            if name not in candidates:
                raise AdapterError(f"layer {name!r} ({type(modules[name]).__name__}) cannot be adapted")
        chosen = names
    if not chosen:
        raise AdapterError("no layer to adapt: the network has no (selected) linear or convolution layer")
    return chosen


def _make_layer(base: nn.Module, config: AdapterConfig) -> AdaptedLayer:
    if config.kind is AdapterKind.LORA:
        return LoRALayer(base, rank=config.rank, alpha=config.alpha)
    return SALTLayer(base, rank=config.rank, lora_rank=config.lora_rank, alpha=config.alpha)


# An adapted network keeps, under this attribute, each parameter's requires_grad from before
# apply_adapter froze them all, so that remove_adapters (without the handle) can restore them too.
_FLAGS_ATTRIBUTE = "_segassist_requires_grad"


def _restore_flags(network: nn.Module, flags: Dict[str, bool]) -> None:
    for key, p in network.named_parameters():
        p.requires_grad_(flags.get(key, True))


def _unwrap(network: nn.Module, layers: Dict[str, AdaptedLayer], flags: Dict[str, bool]) -> None:
    """Put the base layers back in place of ``layers`` and restore each parameter's ``requires_grad``."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        setattr(parent, child, layer.base)
    _restore_flags(network, flags)
    vars(network).pop(_FLAGS_ATTRIBUTE, None)


class AdapterSet:
    """The adapters applied to one network (see :func:`apply_adapter`)."""

    def __init__(
        self,
        network: nn.Module,
        config: AdapterConfig,
        identity: str,
        layers: Dict[str, AdaptedLayer],
        frozen_flags: Dict[str, bool],
    ) -> None:
        self.network = network
        self.config = config
        self.base_identity = identity
        self.layers = layers
        self._frozen_flags = frozen_flags
        self._removed = False

    @property
    def kind(self) -> AdapterKind:
        return self.config.kind

    # --- parameters ---------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        for layer_name, layer in self.layers.items():
            for pname, p in layer.adapter_parameters().items():
                yield f"{layer_name}.{pname}", p

    def parameters(self) -> List[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def base_parameter_count(self) -> int:
        return sum(v.numel() for k, v in base_state_dict(self.network).items() if self._is_param(k))

    def _is_param(self, key: str) -> bool:
        return key in self._frozen_flags

    def trainable_share(self) -> float:
        """Trainable parameters / all parameters (base plus adapter), the usual PEFT convention."""
        trainable = self.trainable_parameter_count()
        return trainable / float(self.base_parameter_count() + trainable)

    # --- merge --------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.layers.values())

    def merge(self) -> None:
        """Fold the adapters into the weights for inference (undo with :meth:`unmerge` to train on)."""
        self._check_alive()
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        self._check_alive()
        for layer in self.layers.values():
            layer.unmerge()

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load adapter parameters (all of them, with matching shapes); unmerges first."""
        self._check_alive()
        own = dict(self.named_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise AdapterError(
                f"adapter state does not fit this adapter: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, p in own.items():
            value = state[name]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(p.shape):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise AdapterError(f"adapter parameter {name}: expected shape {tuple(p.shape)}, got {got}")
            if not value.is_floating_point():  # copied into a float parameter, integers would pass unnoticed
                raise AdapterError(f"adapter parameter {name}: expected floating point values, got {value.dtype}")
            if not torch.isfinite(value).all():
                raise AdapterError(f"adapter parameter {name} holds NaN or infinite values")
        was_merged = self.merged
        self.unmerge()
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(state[name].to(dtype=p.dtype, device=p.device))
        if was_merged:
            self.merge()

    def save(
        self, path: Union[str, Path], meta: Optional[Dict[str, Any]] = None, overwrite: bool = False
    ) -> Path:
        """Write the adapter file atomically (``meta``: JSON-compatible provenance, e.g. version, data)."""
        self._check_alive()
        meta = plain_data(dict(meta or {}), "adapter meta", AdapterError)  # so that weights_only loading reads it
        payload = {
            "format": ADAPTER_FORMAT,
            "format_version": ADAPTER_FORMAT_VERSION,
            "kind": self.kind.value,
            "config": self.config.to_dict(),
            "base_identity": self.base_identity,
            "layers": {name: layer.hyperparameters() for name, layer in self.layers.items()},
            "trainable_parameters": self.trainable_parameter_count(),
            "state": self.state_dict(),
            "meta": meta,
        }
        path = Path(path)
        atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=overwrite)
        return path

    # --- removal ------------------------------------------------------------------------------
    def remove(self, keep_merged: bool = False) -> nn.Module:
        """Put the original layers back and restore each parameter's ``requires_grad``.

        With ``keep_merged`` the adapters' updates stay folded into the weights (a plain network
        with the adapted behaviour, for export); otherwise the exact base weights come back.
        """
        self._check_alive()
        if keep_merged:
            self.merge()
        else:
            self.unmerge()
        _unwrap(self.network, self.layers, self._frozen_flags)
        self._removed = True
        return self.network

    def _check_alive(self) -> None:
        """:class:`AdapterError` once the adapter is off its network: removed through this handle, or by
        :func:`remove_adapters` (then each layer's base module is back in its place, and a merge through
        this handle would change what looks like a plain base network)."""
        if not self._removed and not all(self._in_place(name, layer) for name, layer in self.layers.items()):
            self._removed = True
        if self._removed:
            raise AdapterError(
                "this adapter was removed from its network (its remove(), or remove_adapters): apply or load it "
                "again to use it"
            )

    def _in_place(self, name: str, layer: AdaptedLayer) -> bool:
        try:
            return self.network.get_submodule(name) is layer
        except AttributeError:
            return False

    def summary(self) -> Dict[str, Any]:
        return {
            "kind": self.kind.value,
            "config": self.config.to_dict(),
            "base_identity": self.base_identity,
            "trainable_parameters": self.trainable_parameter_count(),
            "base_parameters": self.base_parameter_count(),
            "trainable_share": self.trainable_share(),
            "merged": self.merged,
        }


def apply_adapter(
    network: nn.Module,
    kind: Union[str, AdapterKind],
    rank: Optional[int] = None,
    *,
    lora_rank: Optional[int] = None,
    alpha: Optional[float] = None,
    targets: Targets = None,
    expected_identity: Optional[str] = None,
) -> AdapterSet:
    """Wrap layers of ``network`` in place with ``kind`` adapters and freeze every base parameter.

    ``rank``: LoRA rank (default 4) or the number of SALT's top singular values (default 8);
    ``lora_rank``: SALT's low-rank update of the rest (default 4); ``alpha``: scale of the
    low-rank update (default: equal to its rank, i.e. scale 1). ``targets``: ``None`` for every
    linear and (transposed) convolution layer, a list of layer names, or a predicate
    ``(name, module) -> bool``. ``expected_identity`` (for example ``LoadedModel.identity``) is
    checked against the network's weights.
    """
    kind = AdapterKind.parse(kind)
    if _adapted_layers(network):
        raise AdapterError("the network already carries adapters: remove() them before applying others")
    identity = base_identity(network)
    if expected_identity is not None and expected_identity != identity:
        raise AdapterError(
            f"the network's weights (identity {identity}) are not the expected base model "
            f"(identity {expected_identity})"
        )
    # every setting and every layer checked before anything is frozen: a refusal leaves the network as it was
    config = _checked_config(kind, rank, lora_rank, alpha)
    names = _select_targets(network, targets)
    for name in names:
        check_adaptable(network.get_submodule(name), name)
    config = replace(config, targets=tuple(names))
    frozen_flags = {key: p.requires_grad for key, p in network.named_parameters()}
    try:
        layers = {name: _make_layer(network.get_submodule(name), config) for name in names}
    except BaseException:  # each layer built froze its base layer: unfrozen again (nothing was wrapped)
        _restore_flags(network, frozen_flags)
        raise
    for p in network.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        setattr(parent, child, layer)
    setattr(network, _FLAGS_ATTRIBUTE, frozen_flags)
    return AdapterSet(network, config, identity, layers, frozen_flags)


def _checked_config(
    kind: AdapterKind, rank: Optional[int], lora_rank: Optional[int], alpha: Optional[float]
) -> AdapterConfig:
    """The config of these settings (defaults filled in); :class:`AdapterError` for a bad one."""
    if kind is AdapterKind.LORA:
        if lora_rank not in (None, 0):
            raise AdapterError("lora_rank is a SALT setting; for LoRA use rank")
        rank = check_rank(DEFAULT_LORA_RANK if rank is None else rank, "LoRA rank", 1)
        return AdapterConfig(kind, rank, 0, check_alpha(alpha, "LoRA"))
    rank = check_rank(DEFAULT_SALT_RANK if rank is None else rank, "SALT rank (number of top singular values)", 1)
    lora_rank = check_rank(DEFAULT_SALT_LORA_RANK if lora_rank is None else lora_rank, "SALT LoRA rank", 0)
    return AdapterConfig(kind, rank, lora_rank, check_alpha(alpha, "SALT"))


def remove_adapters(network: nn.Module) -> nn.Module:
    """Unwrap every adapted layer of a network (original weights back) without its handle, and restore
    each parameter's ``requires_grad`` as it was before :func:`apply_adapter`, as ``AdapterSet.remove`` does."""
    layers = _adapted_layers(network)
    for layer in layers.values():
        layer.unmerge()
    _unwrap(network, layers, getattr(network, _FLAGS_ATTRIBUTE, {}))
    return network


@dataclass(frozen=True)
class AdapterFile:
    path: Path
    config: AdapterConfig
    base_identity: str
    state: Dict[str, torch.Tensor]
    meta: Dict[str, Any]
    trainable_parameters: int


def read_adapter_file(path: Union[str, Path]) -> AdapterFile:
    """Read and check an adapter file without applying it."""
    path = Path(path)
    payload = load_tagged_file(path, ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, "adapter file", AdapterError)
    state = payload.get("state")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"adapter file {path} has no valid 'state'")
    identity = payload.get("base_identity")
    if not isinstance(identity, str) or not identity:
        raise AdapterError(f"adapter file {path} does not say which base model it belongs to")
    config = AdapterConfig.from_dict(payload.get("config", {}))
    version = payload.get("format_version", 0)  # check_format reads a missing one as 0
    if config.kind is AdapterKind.SALT and version < 2:
        raise AdapterError(
            f"adapter file {path} is a SALT adapter of format {version}, whose low-rank part "
            "could not leave the base weight's row space; this SegAssist defines SALT without that limit: "
            "train the adapter again"
        )
    meta = {} if payload.get("meta") is None else payload["meta"]
    if not isinstance(meta, dict):
        raise AdapterError(f"adapter file {path} is damaged: its meta is {type(meta).__name__}, not an object")
    count = payload.get("trainable_parameters", 0)
    if isinstance(count, bool) or not isinstance(count, int):
        raise AdapterError(f"adapter file {path} is damaged: its trainable_parameters is {count!r}, not a number")
    return AdapterFile(
        path=path, config=config, base_identity=identity, state=state, meta=dict(meta), trainable_parameters=count
    )


def load_adapter(network: nn.Module, path: Union[str, Path], merge: bool = False) -> AdapterSet:
    """Apply the adapter saved at ``path`` to ``network`` (a plain base network) and load its weights.

    Raises :class:`AdapterError` when the file was made for different base weights. With ``merge``
    the adapter is folded into the weights at once (inference).
    """
    file = read_adapter_file(path)
    identity = base_identity(network)
    if identity != file.base_identity:
        raise AdapterError(
            f"adapter {file.path.name} was trained on base model {file.base_identity}, but this network "
            f"is base model {identity}: load it onto the model it was trained for"
        )
    adapters = apply_adapter(
        network,
        file.config.kind,
        file.config.rank,
        lora_rank=file.config.lora_rank if file.config.kind is AdapterKind.SALT else None,
        alpha=file.config.alpha,
        targets=list(file.config.targets),
    )
    try:
        adapters.load_state_dict(file.state)
    except BaseException:  # the network as it was: unwrapped, and trainable as before
        adapters.remove()
        raise
    if merge:
        adapters.merge()
    return adapters
