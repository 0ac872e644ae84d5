"""Putting a registered version into a running engine, without a restart.

A version is turned into a plain network with the adapter merged into its weights (inference at
the base model's speed) and handed to :meth:`BuiltinEngine.swap_network`. The base model itself
(``engine.model``) is never modified: every version is built on a fresh copy of the base weights,
so switching back and forth (rollback) is exact.

The engine's ``version`` string names what answers: ``"<base version>+v3"``, or the base
version alone. Sessions report it, and a saved label records it as its adapter version.

:class:`EngineSync` is for the process that owns an engine (the server's inference worker): call
``refresh(engine)`` between requests and it swaps in whatever version the registry holds as
current, after a promotion by the trainer process or a rollback from the CLI. The engine is not
thread-safe, so refresh from the thread that runs inference.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from SegAssistLib.engine.network import (
    LoadedModel,
    NetworkConfig,
    build_network,
    load_tagged_file,
    weights_identity,
)
from SegAssistLib.files import atomic_write, plain_data
from SegAssistLib.learning.adapters import base_state_dict, load_adapter
from SegAssistLib.learning.errors import AdapterError
from SegAssistLib.learning.registry import AdapterRegistry, VersionRecord, model_version

FINETUNE_FORMAT = "segassist-finetune"
FINETUNE_FORMAT_VERSION = 1
FULL = "full"
CURRENT = "current"


def base_copy(base: LoadedModel) -> nn.Module:
    """A new network holding the base model's weights (the base model stays untouched)."""
    network = build_network(base.config)
    network.load_state_dict(base_state_dict(base.network), strict=True)
    return network.eval()


def save_full_version(
    path: Path, network: nn.Module, config: NetworkConfig, base_identity: str, meta: Dict[str, Any]
) -> Path:
    """A fully fine-tuned network (the reference the adapters are compared with), written once;
    ``meta`` as plain data (:class:`AdapterError` for what its loader would refuse)."""
    meta = plain_data(dict(meta), "fine-tuned weights meta", AdapterError)
    payload = {
        "format": FINETUNE_FORMAT,
        "format_version": FINETUNE_FORMAT_VERSION,
        "base_identity": base_identity,
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
        "meta": meta,
    }
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))
    return Path(path)


def load_full_version(base: LoadedModel, path: Union[str, Path]) -> nn.Module:
    """The fully fine-tuned network saved at ``path``. Whatever is wrong with the file (made for other
    base weights, damaged, weights that do not fit the network) is an :class:`AdapterError`: lasting,
    so a server's :class:`EngineSync` tries it again only once the registry changes."""
    path = Path(path)
    payload = load_tagged_file(path, FINETUNE_FORMAT, FINETUNE_FORMAT_VERSION, "fine-tuned weights file", AdapterError)
    if payload.get("base_identity") != base.identity:
        raise AdapterError(
            f"{path.name} was fine-tuned from base model {payload.get('base_identity')}, but the loaded base "
            f"model is {base.identity}"
        )
    network = build_network(base.config)
    state = payload.get("state_dict")
    _check_full_state(path, state, network.state_dict())
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"fine-tuned weights {path.name} do not fit the base network: {exc}") from exc
    broken = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:  # a network of NaN answers nothing and poisons every retraining warm-started from it
        raise AdapterError(f"fine-tuned weights {path.name} hold NaN or infinite values ({', '.join(broken[:3])})")
    return network.eval()


def _check_full_state(path: Path, state: Any, expected: Dict[str, torch.Tensor]) -> None:
    """:class:`AdapterError` unless ``state`` is a dict of tensors, each floating point exactly where the
    network's own is (``load_state_dict`` would silently turn integers into weights)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"fine-tuned weights file {path.name} is damaged: it holds no valid 'state_dict'")
    for name, value in state.items():
        own = expected.get(name)
        if own is not None and value.is_floating_point() != own.is_floating_point():
            raise AdapterError(
                f"fine-tuned weights file {path.name} is damaged: {name} is {value.dtype}, where the network "
                f"holds {own.dtype}"
            )


def version_network(
    base: LoadedModel, registry: AdapterRegistry, record: VersionRecord, merge: bool = True
) -> nn.Module:
    """The network of a registered version on a fresh copy of the base weights.

    With ``merge`` (inference) the adapter is folded into the weights: a plain network; without it
    the network carries its adapter layers (to train on from there).
    """
    if record.base_identity != base.identity:
        raise AdapterError(
            f"version {record.id} was trained on base model {record.base_identity}, but the loaded base "
            f"model is {base.identity}: it cannot be used with these weights"
        )
    path = registry.file_path(record)
    if record.kind == FULL:
        return load_full_version(base, path)
    network = base_copy(base)
    adapters = load_adapter(network, path, merge=merge)
    if merge:
        # a plain network (no wrapper layers): the merged weights, base-model speed, and nothing
        # left that could be trained or un-merged by mistake
        adapters.remove(keep_merged=True)
    return network.eval()


def base_version(engine) -> str:
    """The version string of the engine's base model (what ``BuiltinEngine`` reports unswapped)."""
    model: LoadedModel = engine.model
    return str(model.meta.get("version", model.identity))


def engine_version_for(engine, record: Optional[VersionRecord]) -> str:
    return model_version(base_version(engine), record.id if record is not None else None)


def activate(engine, registry: AdapterRegistry, version: Optional[str] = CURRENT) -> str:
    """Swap the engine to a version: ``"current"`` (the registry's), ``None`` or ``"base"`` (the base
    model) or a version id. Returns the engine's new version string. Does not change the registry.
    """
    if version == CURRENT:
        record = registry.current()
    elif version is None or version == "base":
        record = None
    else:
        record = registry.get(version)
    if record is None:
        engine.swap_network(engine.model.network, engine_version_for(engine, None))
    else:
        engine.swap_network(version_network(engine.model, registry, record), engine_version_for(engine, record))
    return engine.version


def check_version(engine, registry: AdapterRegistry, record: VersionRecord) -> None:
    """Whether ``engine`` can take up ``record``: its network is built as a swap would build it
    (:func:`version_network`: the file read and checked, made for this base model, weights that fit)
    and dropped; the engine is left as it is. :class:`AdapterError` says why not, also for an engine
    that cannot swap versions at all (not the built-in engine). Call it where the engine lives (a
    server's inference worker), before a version is made current."""
    base = getattr(engine, "model", None)
    if base is None or not callable(getattr(engine, "swap_network", None)):
        raise AdapterError(f"this server's engine ({type(engine).__name__}) cannot take up adapter versions")
    version_network(base, registry, record)


class EngineSync:
    """Keeps an engine on the registry's current version (see the module docstring)."""

    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry
        self._stamp: Optional[tuple] = None
        self._applied: Optional[str] = "<never>"
        self.last_error: Optional[str] = None

    def refresh(self, engine, force: bool = False) -> bool:
        """Swap the engine if the current version changed; returns whether it swapped.

        A version that cannot be loaded (made for other base weights, file missing) leaves the
        engine as it is; the reason is kept in ``last_error`` (None again once the engine answers
        with the current version) and the check is retried only after the registry changes again. Any
        other failure (out of memory while swapping, a file being replaced) also leaves the engine as it
        is, and is retried at the next call.
        """
        stamp = self.registry.stamp()
        if not force and stamp == self._stamp:
            return False
        try:
            record = self.registry.current()
            wanted = record.id if record is not None else None
            if not force and wanted == self._applied:  # back to the version answering (a rollback after a
                self._stamp = stamp  # version that could not be loaded): nothing to swap, nothing wrong
                self.last_error = None
                return False
            activate(engine, self.registry, wanted if wanted is not None else None)
        except AdapterError as exc:
            self._stamp = stamp  # lasting: tried again when the registry changes
            self.last_error = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - not this version's fault: tried again next time
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        self._stamp = stamp
        self._applied = wanted
        self.last_error = None
        return True


def network_identity(network: nn.Module) -> str:
    """Identity of a network's current (possibly merged) weights: tells two versions apart."""
    return weights_identity(network.state_dict())
