"""The subject encoders on SigLIP features (the authors' ``AnyStoryReduxImageEncoder``): FLUX.1-Redux's
``redux_up`` / ``redux_down`` with a LoRA on each, a sigmoid gate and gated average pooling under the subject mask.

For SigLIP-so400m-384 last hidden states F (b × 729 × 1152, a 27×27 grid) and the token mask m (b × 729 × 1):

    x = redux_down(silu(redux_up(F) + up_B(up_A(F)))) + down_B(down_A(·))      b × 729 × 4096
    g = sigmoid(gate_proj(x));  x ← x · g
    E = pool(x) / (pool(g) + 1e-6) · [pool(m) > 0]                              b × s² × 4096

``pool`` = adaptive average pooling to s×s: s = 9 → the 81 **Redux subject tokens** (``redux_embedder``), s = 3 →
the 9 **routing tokens** (``router_embedder``). The Redux base weights are ComfyUI's STYLE_MODEL of
``flux1-redux-dev.safetensors`` (keys ``redux_up.*`` / ``redux_down.*``); the file's ``redux`` /
``router_embedder.*`` parts add the LoRA and gate (and override the base where they contain it).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SubjectEncoder", "siglip_token_mask", "REDUX_TOKENS", "ROUTER_TOKENS"]

REDUX_TOKENS = 9   # 9 × 9 = 81 subject tokens
ROUTER_TOKENS = 3  # 3 × 3 = 9 routing tokens
BASE_KEYS = ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")


class SubjectEncoder(nn.Module):
    """Redux with LoRA and gate; ``output_size`` 9 (subject tokens) or 3 (routing tokens)."""

    def __init__(self, redux_base: Mapping[str, torch.Tensor], additions: Mapping[str, torch.Tensor],
                 output_size: int):
        super().__init__()
        sd = {k: v for k, v in redux_base.items() if k in BASE_KEYS}
        sd.update(additions)
        missing = [k for k in BASE_KEYS if k not in sd]
        if missing:
            raise ValueError(f"the Redux base weights lack {missing} (give the STYLE_MODEL of flux1-redux-dev)")
        up, down = sd["redux_up.weight"], sd["redux_down.weight"]
        self.redux_dim, self.width = int(up.shape[1]), int(down.shape[0])
        if down.shape[1] != up.shape[0]:
            raise ValueError(f"redux_up {tuple(up.shape)} and redux_down {tuple(down.shape)} do not chain")
        self.output_size = int(output_size)
        for name, tensor in sd.items():  # held, not copied: two encoders on one Redux share its weights
            self.register_buffer(name.replace(".", "__"), tensor.detach(), persistent=False)
        a = sd["redux_up_lora_A.weight"]
        if a.shape[1] != self.redux_dim or sd["gate_proj.weight"].shape[1] != self.width:
            raise ValueError(f"the AnyStory encoder additions (LoRA A {tuple(a.shape)}, gate "
                             f"{tuple(sd['gate_proj.weight'].shape)}) do not fit Redux {self.redux_dim}→{self.width}")

    def _w(self, name: str, like: torch.Tensor):
        t = getattr(self, name.replace(".", "__"), None)
        return None if t is None else t.to(device=like.device, dtype=like.dtype)

    def _linear(self, x, name):
        return F.linear(x, self._w(f"{name}.weight", x), self._w(f"{name}.bias", x))

    def forward(self, features: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """features b × s_in² × redux_dim (SigLIP last hidden state), token_mask b × s_in² × 1 → b × s² × width."""
        x = features
        x = self._linear(x, "redux_up") + self._linear(self._linear(x, "redux_up_lora_A"), "redux_up_lora_B")
        x = F.silu(x)
        x = self._linear(x, "redux_down") + self._linear(self._linear(x, "redux_down_lora_A"), "redux_down_lora_B")
        gate = torch.sigmoid(self._linear(x, "gate_proj"))
        x = x * gate
        b, n, d = x.shape
        s = int(round(n ** 0.5))
        if s * s != n:
            raise ValueError(f"{n} SigLIP tokens are not a square grid")
        pool = (self.output_size, self.output_size)
        x = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(b, d, s, s), pool)
        gate = F.adaptive_avg_pool2d(gate.transpose(1, 2).reshape(b, -1, s, s), pool)
        mask = token_mask.to(x.dtype).transpose(1, 2).reshape(b, -1, s, s)
        mask = (F.adaptive_avg_pool2d(mask, pool) > 0).to(x)
        x = (x / (gate + 1e-6)) * mask
        return x.flatten(2).transpose(1, 2)


def siglip_token_mask(mask: torch.Tensor, grid: int = 27) -> torch.Tensor:
    """The subject mask at the SigLIP input resolution (b × H × W or b × 1 × H × W, 1 = subject; the authors
    resize it to 384×384 with nearest sampling) → the token mask b × grid² × 1 (1 where any pixel is subject)."""
    if mask.ndim == 3:
        mask = mask[:, None]
    m = (F.adaptive_avg_pool2d(mask.float(), (grid, grid)) > 0).float()
    return m.flatten(2).transpose(1, 2)
