"""LoRA and SALT adapters for the built-in network (and any network of linear and (transposed)
convolution layers). Needs torch. See ``layers`` for why this is our own implementation and not
``peft``, ``lora`` and ``salt`` for the two methods, ``core`` for applying, merging and files.

Typical use::

    adapters = apply_adapter(network, "salt")            # wraps layers in place, freezes the base
    optimiser = torch.optim.AdamW(adapters.parameters(), lr=1e-3)
    ...train...
    adapters.save(path, meta={"version": "v3"})
    adapters.merge()                                     # inference at base-model speed

    adapters = load_adapter(fresh_base_network, path, merge=True)   # refuses another base model
"""

from SegAssistLib.learning.adapters.core import (
    ADAPTER_FORMAT,
    ADAPTER_FORMAT_VERSION,
    DEFAULT_LORA_RANK,
    DEFAULT_SALT_LORA_RANK,
    DEFAULT_SALT_RANK,
    AdapterConfig,
    AdapterFile,
    AdapterKind,
    AdapterSet,
    apply_adapter,
    base_identity,
    base_state_dict,
    load_adapter,
    read_adapter_file,
    remove_adapters,
)
from SegAssistLib.learning.adapters.layers import AdaptedLayer
from SegAssistLib.learning.adapters.lora import LoRALayer
from SegAssistLib.learning.adapters.salt import SALTLayer
from SegAssistLib.learning.errors import AdapterError

__all__ = [
    "ADAPTER_FORMAT",
    "ADAPTER_FORMAT_VERSION",
    "DEFAULT_LORA_RANK",
    "DEFAULT_SALT_LORA_RANK",
    "DEFAULT_SALT_RANK",
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterError",
    "AdapterFile",
    "AdapterKind",
    "AdapterSet",
    "LoRALayer",
    "SALTLayer",
    "apply_adapter",
    "base_identity",
    "base_state_dict",
    "load_adapter",
    "read_adapter_file",
    "remove_adapters",
]
