"""Checkpoints."""
from .adapter import adapter_from_state_dict, inspect_file, load_adapter, save_adapter
from .diagnosis import FORMAT_ADAPTER, FORMAT_REFNET, FORMAT_VERSION, CheckpointError
from .refnet import RefNetWeights, build_refnet_state_dict, load_refnet, save_refnet

__all__ = [
    "CheckpointError", "FORMAT_ADAPTER", "FORMAT_REFNET", "FORMAT_VERSION",
    "load_adapter", "adapter_from_state_dict", "save_adapter",
    "RefNetWeights", "load_refnet", "save_refnet", "build_refnet_state_dict", "inspect_file",
]
