"""Preview images in the editor (the same temp-folder mechanism as ComfyUI's PreviewImage)."""
from __future__ import annotations

import os
import secrets

import numpy as np
import torch
from PIL import Image

import folder_paths


def preview_images(images: torch.Tensor, prefix: str = "anystory", max_side: int = 0, jpeg: bool = False) -> dict:
    """Save [B, H, W, 3] float images to ComfyUI's temp folder; return the node's ``ui`` dict.
    ``max_side`` > 0 shrinks larger images first (a node-sized preview: writing the file is host time);
    ``jpeg``: a JPEG (quality 90) instead of a PNG — several times cheaper to write for a photo crop."""
    out_dir = folder_paths.get_temp_directory()
    os.makedirs(out_dir, exist_ok=True)
    if max_side and max(images.shape[1:3]) > max_side:
        s = max_side / max(images.shape[1:3])
        size = (max(1, round(images.shape[1] * s)), max(1, round(images.shape[2] * s)))
        images = torch.nn.functional.interpolate(images.movedim(-1, 1).float(), size=size, mode="area").movedim(1, -1)
    results = []
    for img in images:
        arr = (img.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
        name = f"{prefix}_{secrets.token_hex(4)}.{'jpg' if jpeg else 'png'}"
        Image.fromarray(arr).save(os.path.join(out_dir, name), **({"quality": 90} if jpeg else {"compress_level": 1}))
        results.append({"filename": name, "subfolder": "", "type": "temp"})
    return {"images": results}
