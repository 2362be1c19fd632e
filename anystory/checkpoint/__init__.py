"""Checkpoints: read and write the AnyStory model ("router loading") and the ReferenceNet.

Two files, so that the large ReferenceNet stays optional:

- the **AnyStory model** (``anystory_sdxl.safetensors``, or the public IP-Adapter Plus SDXL ViT-H as the
  subject branch): the subject QFormer → E_i, the per-layer Ŵ_k^l / Ŵ_v^l of eq. 5, and optionally the
  routing QFormer → R_i and the per-layer routers → M_i^l (``adapter``);
- the **ReferenceNet** (``anystory_sdxl_refnet.safetensors``): the UNet without cross-attention that gives
  G_i^l for the routed reference attention (``refnet``).

Files are only ever read with ``safetensors`` or ``torch.load(..., weights_only=True)`` and written
atomically (``io``). A file that cannot be used is refused with a :class:`CheckpointError` whose message
says, in one sentence, what the file is and which file to pick (``diagnosis``).
"""
from .adapter import adapter_from_state_dict, inspect_file, load_adapter, save_adapter
from .diagnosis import FORMAT_ADAPTER, FORMAT_REFNET, FORMAT_VERSION, CheckpointError
from .refnet import RefNetWeights, build_refnet_state_dict, is_refnet_file, load_refnet, save_refnet

__all__ = [
    "CheckpointError", "FORMAT_ADAPTER", "FORMAT_REFNET", "FORMAT_VERSION",
    "load_adapter", "adapter_from_state_dict", "save_adapter",
    "RefNetWeights", "is_refnet_file", "load_refnet", "save_refnet", "build_refnet_state_dict", "inspect_file",
]
