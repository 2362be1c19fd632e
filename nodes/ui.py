"""Preview images in the editor (the same temp-folder mechanism as ComfyUI's PreviewImage)."""
from __future__ import annotations

import os
import secrets

import numpy as np
import torch
from PIL import Image

import folder_paths


def preview_images(images: torch.Tensor, prefix: str = "anystory") -> dict:
    """Save [B, H, W, 3] float images to ComfyUI's temp folder; return the node's ``ui`` dict."""
    out_dir = folder_paths.get_temp_directory()
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for img in images:
        arr = (img.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
        name = f"{prefix}_{secrets.token_hex(4)}.png"
        Image.fromarray(arr).save(os.path.join(out_dir, name), compress_level=1)
        results.append({"filename": name, "subfolder": "", "type": "temp"})
    return {"images": results}
