"""The built-in promptable network and its checkpoint format.

The network is a plain MONAI 3D U-Net: prompts enter as input channels (see ``encoding.CHANNELS``),
the output is one logit channel. A checkpoint is a ``torch.save`` dict::

    {"format": "segassist-checkpoint", "format_version": 1,
     "config": NetworkConfig as dict, "state_dict": ..., "meta": {...free-form provenance...}}

loaded with ``weights_only=True`` (no pickle of arbitrary objects). The ``config`` is required, and
when ``meta`` records how the network was trained (``train_config.network``, as ``segassist train``
writes it) the two must agree: a config edited after training (another ``patch_size``) would run the
weights on inputs they were never trained on, without an error.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Type, Union

import numpy as np
import torch
from monai.networks.nets import UNet

from SegAssistLib.errors import DeviceError, ModelError
from SegAssistLib.files import atomic_write, check_format, plain_data

CHECKPOINT_FORMAT = "segassist-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class NetworkConfig:
    in_channels: int = 7
    out_channels: int = 1
    channels: Tuple[int, ...] = (16, 32, 64, 128)
    strides: Tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 0
    patch_size: int = 64

    @classmethod
    def from_dict(cls, data: Dict[str, Any], strict: bool = False) -> NetworkConfig:
        """The config of ``data``; keys it does not know are dropped, or with ``strict`` (a config a
        person wrote: a typo would otherwise train the default network) a :class:`ModelError` naming them."""
        if strict:
            unknown = sorted(str(k) for k in data if k not in cls.__dataclass_fields__)
            if unknown:
                raise ModelError(f"unknown network setting(s) {', '.join(unknown)} "
                                 f"(NetworkConfig has {', '.join(cls.__dataclass_fields__)})")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("channels", "strides"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


MAX_WIDTH = 512  # feature channels of a level: at most ~0.5 GB of weights for the deepest config allowed


def config_problem(config: NetworkConfig) -> Optional[str]:
    """What makes ``config`` a network the engine cannot run (None: nothing): it must take the engine's
    input channels and give one logit, with a patch its strides divide, within sane sizes. Checked
    before the network is built: a config of a few bytes (channels of 30000) asked for 97 GB."""
    from SegAssistLib.engine.encoding import CHANNELS

    def ints(values: Any) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in values)

    if not ints((config.in_channels, config.out_channels, config.num_res_units, config.patch_size)):
        return "in_channels, out_channels, num_res_units and patch_size must be integers"
    if config.in_channels != len(CHANNELS):
        return (f"its network takes {config.in_channels} input channels; the engine encodes {len(CHANNELS)} "
                f"({', '.join(CHANNELS)})")
    if config.out_channels != 1:
        return f"its network gives {config.out_channels} output channels; the engine reads one logit"
    if not ints(config.channels) or not ints(config.strides) or not 2 <= len(config.channels) <= 8:
        return f"channels {list(config.channels)} must be 2 to 8 integers, strides integers"
    if len(config.strides) != len(config.channels) - 1:
        return f"strides {list(config.strides)} must have one entry fewer than channels {list(config.channels)}"
    if not all(1 <= c <= MAX_WIDTH for c in config.channels) or not all(1 <= s <= 4 for s in config.strides):
        return (f"channels must be 1 to {MAX_WIDTH} and strides 1 to 4, got {list(config.channels)}, "
                f"{list(config.strides)}")
    if not 0 <= config.num_res_units <= 8:
        return f"num_res_units {config.num_res_units} must be 0 to 8"
    step = int(np.prod(config.strides))
    if not 8 <= config.patch_size <= 512 or config.patch_size % step:
        return f"patch_size {config.patch_size} must be 8 to 512 and a multiple of the strides' product {step}"
    return None


def build_network(config: NetworkConfig) -> torch.nn.Module:
    return UNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
    )


@dataclass
class LoadedModel:
    network: torch.nn.Module
    config: NetworkConfig
    meta: Dict[str, Any] = field(default_factory=dict)
    identity: str = ""  # hash of the base weights: adapters check it before they load


def weights_identity(state_dict: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(
    path: Union[str, Path], network: torch.nn.Module, config: NetworkConfig, meta: Dict[str, Any]
) -> Path:
    """Write a checkpoint atomically; ``meta`` is stored as plain data (see
    :func:`~SegAssistLib.files.plain_data`: a :class:`ModelError` for what ``load_checkpoint`` would refuse)."""
    path = Path(path)
    meta = plain_data(meta, "checkpoint meta", ModelError)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "meta": meta,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=True)
    return path


def load_tagged_file(
    path: Union[str, Path], fmt: str, version: int, what: str, error: Type[Exception]
) -> Dict[str, Any]:
    """The dict in a SegAssist torch file (a checkpoint, an adapter, fine-tuned weights), loaded with
    ``weights_only=True`` and checked with :func:`~SegAssistLib.files.check_format`.

    Every failure (missing, unreadable, another kind of file, a newer format) is an ``error`` whose
    message calls the file a ``what``.
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not a {what} file")
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's own message suggests weights_only=False: never
        if not zipfile.is_zipfile(path):
            raise error(f"cannot read {what} {path}: not a torch file (a truncated download, or a Git LFS "
                        "pointer instead of the weights?)") from exc
        raise error(f"cannot read {what} {path}: it holds Python objects beyond tensors and plain data "
                    "(refused: loading them could run code)") from exc
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise error(f"cannot read {what} {path}: {reason}") from exc
    return check_format(payload, path, fmt, version, what, error)


def torch_device(name: Union[str, torch.device]) -> torch.device:
    """The torch device called ``name``; :class:`DeviceError` for an unknown name or a GPU torch
    cannot see."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"invalid device {name!r} (cpu, cuda or cuda:N): {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {name!r} is not supported: use cpu, cuda or cuda:N")
    return device


def trained_config_problem(config: NetworkConfig, meta: Dict[str, Any]) -> Optional[str]:
    """How ``config`` disagrees with the network ``meta`` says was trained (``meta["train_config"]
    ["network"]``, the keys it gives; keys NetworkConfig does not know are left out); None: it agrees,
    or ``meta`` records no training config."""
    train_config = meta.get("train_config")
    trained = train_config.get("network") if isinstance(train_config, dict) else None
    if not isinstance(trained, dict):
        return None
    differ = []
    for name in NetworkConfig.__dataclass_fields__:
        if name not in trained:
            continue
        value = trained[name]
        value = tuple(value) if isinstance(value, (list, tuple)) else value
        if value != getattr(config, name):
            differ.append(f"{name} {getattr(config, name)!r} in its config, {value!r} in meta.train_config.network")
    return "; ".join(differ) or None


def load_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """Load a SegAssist checkpoint; raises :class:`ModelError` saying what is wrong."""
    path = Path(path)
    device = torch_device(device)
    payload = load_tagged_file(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint", ModelError)
    if "config" not in payload:  # the defaults would be a guess at the network the weights belong to
        raise ModelError(f"checkpoint {path} has no network config (its 'config' entry is missing): cannot tell "
                         "which network its weights belong to")
    try:
        config = NetworkConfig.from_dict(payload["config"])
        problem = config_problem(config)
        if problem:
            raise ModelError(f"checkpoint {path} is not a network this engine runs: {problem}")
        meta = dict(payload.get("meta", {}))
        disagrees = trained_config_problem(config, meta)
        if disagrees:
            raise ModelError(f"checkpoint {path}: its network config disagrees with the one it was trained with "
                             f"({disagrees}): the config was edited after training; use the trained one")
        network = build_network(config)
    except ModelError:
        raise
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:  # tagged as a checkpoint, fields not
        raise ModelError(f"checkpoint {path} has a malformed network config or meta: {exc}") from exc
    try:
        network.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"checkpoint {path} does not match its network config: {exc}") from exc
    bad = next((name for name, t in network.state_dict().items() if t.is_floating_point() and not t.isfinite().all()),
               None)  # fmt: skip
    if bad is not None:  # every answer would be NaN: an empty mask, said by no error
        raise ModelError(f"checkpoint {path} holds NaN or infinite weights ({bad}): it cannot segment")
    network.to(device).eval()
    # the identity of the weights as loaded (float32): one stored in float16 is the same network, and
    # adapters check the identity of the network they are applied to
    return LoadedModel(network, config, meta, weights_identity(network.state_dict()))
