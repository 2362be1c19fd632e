"""Cross-attention layer layout of an SDXL-family UNet.

AnyStory touches every transformer block l = 1…L of the denoising UNet: the router and the routed
decoupled cross-attention (eq. 5) sit at its attn2, the routed reference attention (eq. 6-8) at its
attn1. SDXL has L = 70 such blocks; distilled SDXL-family models (KOALA, SSD-1B) have fewer, so the
layout is always discovered from the UNet that is patched and checked against the checkpoint.

Two orders matter:
- **execution order** (input blocks, middle, output blocks): the order in which the UNet runs the
  blocks, so "the previous layer" l-1 of eq. 6-8 is the previous entry in this order;
- **checkpoint order** (input, output, middle = diffusers' down, up, mid): IP-Adapter numbers the
  attn2 processors 1, 3, 5, … in this order (attn1 processors take the even numbers), and the native
  AnyStory checkpoint reuses that numbering for ``ip_adapter.{N}`` and ``router.{N}``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

BlockKey = tuple  # (block name, block id, block_index), ComfyUI's transformer_options naming

_EXEC_RANK = {"input": 0, "middle": 1, "output": 2}
_CKPT_RANK = {"input": 0, "output": 1, "middle": 2}


@dataclass(frozen=True)
class LayerSpec:
    """One transformer block l of the denoising UNet.

    key: ``(name, id, block_index)`` as ComfyUI names it, e.g. ``("input", 4, 0)``.
    dim: width C of the block's tokens (= heads × dim_head).
    heads: attention heads of attn1/attn2.
    exec_index: position l-1 in execution order (0-based).
    ckpt_index: IP-Adapter's odd processor number N (1, 3, …) used by checkpoint keys.
    """

    key: BlockKey
    dim: int
    heads: int
    exec_index: int
    ckpt_index: int

    @property
    def dim_head(self) -> int:
        return self.dim // self.heads


class LayerLayout(Sequence):
    """The ordered list of transformer blocks (execution order) with look-ups by key and ckpt index."""

    def __init__(self, blocks: Iterable[tuple[BlockKey, int, int]]):
        blocks = [(tuple(k), int(d), int(h)) for k, d, h in blocks]
        keys = [b[0] for b in blocks]
        if len(set(keys)) != len(keys):
            raise ValueError("LayerLayout: duplicate block keys")
        for k in keys:
            if len(k) != 3 or k[0] not in _EXEC_RANK:
                raise ValueError(f"LayerLayout: bad block key {k!r}; expected (input|middle|output, id, index)")
        exec_sorted = sorted(blocks, key=lambda b: (_EXEC_RANK[b[0][0]], b[0][1], b[0][2]))
        ckpt_sorted = sorted(blocks, key=lambda b: (_CKPT_RANK[b[0][0]], b[0][1], b[0][2]))
        ckpt_of = {b[0]: 2 * i + 1 for i, b in enumerate(ckpt_sorted)}
        self._specs = [LayerSpec(k, d, h, i, ckpt_of[k]) for i, (k, d, h) in enumerate(exec_sorted)]
        self._by_key = {s.key: s for s in self._specs}
        self._by_ckpt = {s.ckpt_index: s for s in self._specs}

    def __getitem__(self, i):
        return self._specs[i]

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"LayerLayout({len(self)} layers, widths {sorted(set(s.dim for s in self))})"

    def by_key(self, key: BlockKey) -> LayerSpec:
        return self._by_key[tuple(key)]

    def get(self, key: BlockKey):
        return self._by_key.get(tuple(key))

    @property
    def ckpt_indices(self) -> list[int]:
        return sorted(self._by_ckpt)

    def signature(self) -> list[tuple[int, int]]:
        """(ckpt index, width) pairs: what a checkpoint's per-layer weights must match."""
        return [(n, self._by_ckpt[n].dim) for n in self.ckpt_indices]

    def describe(self) -> str:
        groups: dict[tuple, int] = {}
        for s in self:
            g = (s.key[0], s.key[1], s.dim)
            groups[g] = groups.get(g, 0) + 1
        return ", ".join(f"{n}{i}×{c}(C={d})" for (n, i, d), c in groups.items())


def sdxl_layout() -> LayerLayout:
    """SDXL base: 70 blocks (10 at 1/2 resolution with C=640, 60 at 1/4 with C=1280), 64-d heads."""
    blocks = []
    for name, ids, depth, dim in (
        ("input", (4, 5), 2, 640),
        ("input", (7, 8), 10, 1280),
        ("middle", (0,), 10, 1280),
        ("output", (0, 1, 2), 10, 1280),
        ("output", (3, 4, 5), 2, 640),
    ):
        for i in ids:
            for j in range(depth):
                blocks.append(((name, i, j), dim, dim // 64))
    return LayerLayout(blocks)


def transformer_blocks(unet) -> dict:
    """layer key → transformer block (BasicTransformerBlock) of a ComfyUI/ldm ``UNetModel``
    (``input_blocks``, ``middle_block``, ``output_blocks`` whose SpatialTransformers hold
    ``transformer_blocks``), in execution order."""
    out = {}

    def scan(name, idx, seq):
        for mod in seq:
            for j, tb in enumerate(getattr(mod, "transformer_blocks", None) or []):
                out[(name, idx, j)] = tb

    for i, blk in enumerate(getattr(unet, "input_blocks", [])):
        scan("input", i, blk)
    mid = getattr(unet, "middle_block", None)
    if mid is not None:
        scan("middle", 0, mid)
    for i, blk in enumerate(getattr(unet, "output_blocks", [])):
        scan("output", i, blk)
    return out


def discover_layout(unet) -> LayerLayout:
    """The layout of a ComfyUI/ldm ``UNetModel``, read from the module tree itself."""
    blocks = []
    for key, tb in transformer_blocks(unet).items():
        attn = getattr(tb, "attn2", None) or tb.attn1
        blocks.append((key, int(attn.to_q.weight.shape[0]), int(getattr(attn, "heads"))))
    return LayerLayout(blocks)


def block_key(extra_options: dict) -> BlockKey:
    """The layer key of the block a ComfyUI attention hook runs in (its ``extra_options``)."""
    b = extra_options["block"]
    return (b[0], b[1], extra_options.get("block_index", 0))


def hook_grid(extra_options: dict):
    """(h, w) token grid of the block a ComfyUI attention hook runs in, or None (older ComfyUI)."""
    shape = extra_options.get("activations_shape")
    return (int(shape[-2]), int(shape[-1])) if shape is not None else None


def layout_from_state_dict(sd: dict, prefix: str = "", dim_head: int = 64) -> LayerLayout:
    """The layout of an ldm-named UNet state dict (``input_blocks.4.1.transformer_blocks.0.attn1…``),
    e.g. a checkpoint's ``model.diffusion_model.`` part or a ReferenceNet. Heads = C / dim_head."""
    pat = re.compile(re.escape(prefix) + r"(input_blocks|middle_block|output_blocks)\.?(\d*)\.\d+\."
                     r"transformer_blocks\.(\d+)\.attn1\.to_q\.weight$")
    names = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
    blocks = []
    for k, w in sd.items():
        m = pat.match(k)
        if not m:
            continue
        name = names[m.group(1)]
        idx = 0 if name == "middle" else int(m.group(2))
        dim = int(w.shape[0])
        blocks.append(((name, idx, int(m.group(3))), dim, max(1, dim // dim_head)))
    return LayerLayout(blocks)
