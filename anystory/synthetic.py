"""Random-weight AnyStory / IP-Adapter models with the real key names and shapes.

No model weights can be downloaded where this pack is built and tested, so tests and the demo make
their own: same architecture, same key names, random values. Never used at run time by the nodes.
"""
from __future__ import annotations

from typing import Optional

import torch

from .adapter import KIND_IPADAPTER_PLUS, KIND_NATIVE, AnyStoryAdapter
from .layers import LayerLayout
from .paper.encoder import Resampler


def _init_(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("latents"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif p.ndim == 1 and ("norm" in name):
                p.copy_(1.0 + 0.01 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.01 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def random_adapter(layout: LayerLayout, kind: str = KIND_NATIVE, num_tokens: Optional[int] = None,
                   router_dim: int = 256, router_heads: int = 4, clip_dim: int = 1280, qformer_dim: int = 1280,
                   depth: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32,
                   reference_proj=None) -> AnyStoryAdapter:
    """An adapter for ``layout`` with random weights.

    kind: "anystory-sdxl" (subject + routing QFormer + router; m=64 by default) or
    "ip-adapter-plus-sdxl" (subject QFormer + Ŵ_k/Ŵ_v only; m=16 as ip-adapter-plus_sdxl_vit-h).
    reference_proj (native only): W̃_k^l, W̃_v^l of eq. 6-8 for ``"all"`` layers or a list of layers N
    (``reference_proj.N.*``), random near the identity (I + noise: keys/values close to the UNet's
    stand-in scale); None: none (the UNet's attn1 stands in)."""
    native = kind == KIND_NATIVE
    m = num_tokens or (64 if native else 16)
    heads = max(1, qformer_dim // 64)
    subject = Resampler(dim=qformer_dim, depth=depth, heads=heads, num_queries=m, embedding_dim=clip_dim)
    routing = None
    if native:
        routing = Resampler(dim=qformer_dim, depth=depth, heads=heads, num_queries=1, embedding_dim=clip_dim)
    dims = {s.ckpt_index: s.dim for s in layout}
    if reference_proj is not None and not native:
        raise ValueError("reference projections (W̃) belong to native AnyStory files only")
    ref_layers = sorted(dims) if reference_proj == "all" else reference_proj
    ad = AnyStoryAdapter(subject, dims, routing_proj=routing, router_dim=router_dim, router_heads=router_heads,
                         with_router=native, kind=kind, meta={"format": kind, "synthetic": "random weights"})
    if ref_layers:
        with torch.random.fork_rng(devices=[]):  # the global RNG moves as without W̃ (callers seed after)
            ad.attach_reference_proj(ref_layers)
    _init_(ad, seed)  # W̃ come last: every other weight is the same as without them
    if ad.reference_proj is not None:
        with torch.no_grad():
            for proj in ad.reference_proj.values():
                for lin in (proj.to_k, proj.to_v):
                    lin.weight.add_(torch.eye(lin.weight.shape[0]))
    return ad.to(dtype)


def ipadapter_plus_state_dict(layout: LayerLayout, num_tokens: int = 16, seed: int = 0,
                              dtype: torch.dtype = torch.float16, **kw) -> dict:
    """The state dict of an ip-adapter-plus_sdxl_vit-h file: ``image_proj.*`` + ``ip_adapter.{N}.*``."""
    ad = random_adapter(layout, KIND_IPADAPTER_PLUS, num_tokens=num_tokens, seed=seed, dtype=dtype, **kw)
    sd = {}
    for k, v in ad.state_dict().items():
        if k.startswith("subject_proj."):
            k = "image_proj." + k[len("subject_proj."):]
        sd[k] = v.contiguous()
    return sd


# --- files that are NOT usable as AnyStory adapters (tests of the checkpoint loader's refusals) ---------

def sd15_layout() -> LayerLayout:
    """SD1.5: 16 transformer blocks (C = 320/640/1280, 8 heads), IP-Adapter numbers them 1, 3, …, 31."""
    blocks = []
    for name, ids, dim in (("input", (1, 2), 320), ("input", (4, 5), 640), ("input", (7, 8), 1280),
                           ("middle", (0,), 1280), ("output", (3, 4, 5), 1280), ("output", (6, 7, 8), 640),
                           ("output", (9, 10, 11), 320)):
        for i in ids:
            blocks.append(((name, i, 0), dim, 8))
    return LayerLayout(blocks)


def _zeros_like_module(module_factory, prefix: str, dtype: torch.dtype) -> dict:
    with torch.device("meta"):
        mod = module_factory()
    return {prefix + k: torch.zeros(v.shape, dtype=dtype) for k, v in mod.state_dict().items()}


def _ip_layers(layout: LayerLayout, context_dim: int, dtype: torch.dtype) -> dict:
    sd = {}
    for s in layout:
        for w in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{s.ckpt_index}.{w}.weight"] = torch.zeros(s.dim, context_dim, dtype=dtype)
    return sd


def sd15_ipadapter_plus_state_dict(dtype: torch.dtype = torch.float16) -> dict:
    """ip-adapter-plus_sd15 at its real shapes (zeros): Resampler 768-wide (12 heads, 16 queries, CLIP-H
    1280 in, 768 out) + 16 layers of to_k_ip/to_v_ip C×768 numbered 1…31."""
    sd = _zeros_like_module(lambda: Resampler(dim=768, depth=4, heads=12, num_queries=16, embedding_dim=1280,
                                              output_dim=768), "image_proj.", dtype)
    sd.update(_ip_layers(sd15_layout(), 768, dtype))
    return sd


def ipadapter_nonplus_state_dict(layout: LayerLayout, context_dim: int = 2048, clip_dim: int = 1024,
                                 tokens: int = 4, dtype: torch.dtype = torch.float16) -> dict:
    """A non-Plus IP-Adapter (ip-adapter_sdxl_vit-h / ip-adapter_sd15): ``image_proj.proj`` maps the pooled
    CLIP embedding to ``tokens`` context tokens, ``image_proj.norm``; no Resampler latents."""
    sd = {"image_proj.proj.weight": torch.zeros(tokens * context_dim, clip_dim, dtype=dtype),
          "image_proj.proj.bias": torch.zeros(tokens * context_dim, dtype=dtype),
          "image_proj.norm.weight": torch.ones(context_dim, dtype=dtype),
          "image_proj.norm.bias": torch.zeros(context_dim, dtype=dtype)}
    sd.update(_ip_layers(layout, context_dim, dtype))
    return sd


def ipadapter_faceid_state_dict(layout: LayerLayout, plus: bool = False, lora_rank: int = 4,
                                context_dim: int = 2048, dtype: torch.dtype = torch.float16) -> dict:
    """An IP-Adapter FaceID(-PlusV2) file's key names: MLP ``image_proj.proj.0/2`` + ``norm`` on a 512-d
    face embedding (PlusV2 adds ``image_proj.perceiver_resampler.*``), per-layer to_k_ip/to_v_ip and LoRA
    weights ``ip_adapter.{i}.to_{q,k,v,out}_lora.{down,up}.weight`` for every processor i (attn1 = even,
    attn2 = odd). LoRA rank and the resampler are reduced; the names and the projection shapes are real."""
    sd = {"image_proj.proj.0.weight": torch.zeros(1024, 512, dtype=dtype),
          "image_proj.proj.0.bias": torch.zeros(1024, dtype=dtype),
          "image_proj.proj.2.weight": torch.zeros(4 * context_dim, 1024, dtype=dtype),
          "image_proj.proj.2.bias": torch.zeros(4 * context_dim, dtype=dtype),
          "image_proj.norm.weight": torch.ones(context_dim, dtype=dtype),
          "image_proj.norm.bias": torch.zeros(context_dim, dtype=dtype)}
    if plus:
        sd.update(_zeros_like_module(lambda: Resampler(dim=64, depth=1, heads=1, num_queries=4, embedding_dim=64,
                                                       output_dim=64), "image_proj.perceiver_resampler.", dtype))
    sd.update(_ip_layers(layout, context_dim, dtype))
    for s in layout:
        for i, kv_in in ((s.ckpt_index - 1, s.dim), (s.ckpt_index, context_dim)):
            for w, d_in in (("to_q_lora", s.dim), ("to_k_lora", kv_in), ("to_v_lora", kv_in), ("to_out_lora", s.dim)):
                sd[f"ip_adapter.{i}.{w}.down.weight"] = torch.zeros(lora_rank, d_in, dtype=dtype)
                sd[f"ip_adapter.{i}.{w}.up.weight"] = torch.zeros(s.dim, lora_rank, dtype=dtype)
    return sd


def flux_ipadapter_state_dict(double_blocks: int = 2, width: int = 64, clip_dim: int = 32, tokens: int = 4,
                              dtype: torch.dtype = torch.float16) -> dict:
    """A Flux IP-Adapter file's key names (XLabs layout): ``ip_adapter_proj_model.*`` and
    ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*``. Shapes reduced (Flux: 19
    blocks, width 3072, context 4096)."""
    sd = {"ip_adapter_proj_model.proj.weight": torch.zeros(tokens * width, clip_dim, dtype=dtype),
          "ip_adapter_proj_model.proj.bias": torch.zeros(tokens * width, dtype=dtype),
          "ip_adapter_proj_model.norm.weight": torch.ones(width, dtype=dtype),
          "ip_adapter_proj_model.norm.bias": torch.zeros(width, dtype=dtype)}
    for i in range(double_blocks):
        for w in ("k", "v"):
            p = f"double_blocks.{i}.processor.ip_adapter_double_stream_{w}_proj"
            sd[p + ".weight"] = torch.zeros(width, width, dtype=dtype)
            sd[p + ".bias"] = torch.zeros(width, dtype=dtype)
    return sd


# ------------------------------------------------------------------------------------------------
# AnyStory FLUX (the authors' anystory_flux.bin layout)
# ------------------------------------------------------------------------------------------------
def flux_module_shapes(hidden: int = 3072, mlp: int = 12288, joint: int = 4096, in_channels: int = 64) -> dict:
    """(in, out) of every diffusers FluxTransformer2DModel linear the AnyStory FLUX LoRAs target, by module name
    inside a block ("top" for the embedders)."""
    return {
        "top": {"x_embedder": (in_channels, hidden), "context_embedder": (joint, hidden)},
        "double": {"norm1.linear": (hidden, 6 * hidden), "norm1_context.linear": (hidden, 6 * hidden),
                   "attn.to_q": (hidden, hidden), "attn.to_k": (hidden, hidden), "attn.to_v": (hidden, hidden),
                   "attn.add_q_proj": (hidden, hidden), "attn.add_k_proj": (hidden, hidden),
                   "attn.add_v_proj": (hidden, hidden), "attn.to_out.0": (hidden, hidden),
                   "attn.to_add_out": (hidden, hidden), "ff.net.2": (mlp, hidden), "ff_context.net.2": (mlp, hidden)},
        "single": {"norm.linear": (hidden, 3 * hidden), "proj_mlp": (hidden, mlp), "attn.to_q": (hidden, hidden),
                   "attn.to_k": (hidden, hidden), "attn.to_v": (hidden, hidden), "proj_out": (hidden + mlp, hidden)},
    }


def flux_anystory_parts(depth: int = 19, depth_single: int = 38, hidden: int = 3072, mlp: int = 12288,
                        joint: int = 4096, siglip: int = 1152, rank: int = 128, embedder_rank: int = 128,
                        routing_rank: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32,
                        device="cpu") -> dict:
    """A random AnyStory FLUX file in the released layout ({"ref", "redux", "router"}, the key names the authors'
    loader reads; see anystory.flux.checkpoint): peft LoRAs of ``rank`` at the sites the authors enable (no
    ``.alpha`` keys: scale 1; the router LoRA with ``lora_B.bias``), the Redux/router embedder additions (LoRA of
    ``embedder_rank`` with B biases, gate) and the per-block routing-map LoRA of ``routing_rank``. The LoRA B
    matrices are small (std 0.002), so the deltas perturb, not swamp, the model."""
    from .flux.lora import REF_SITES, ROUTER_SITES
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = flux_module_shapes(hidden, mlp, joint)

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    def peft(sites, bias: bool) -> dict:
        out = {}
        names = [(n, shapes["top"][n]) for n in sites["top"]]
        names += [(f"transformer_blocks.{i}.{s}", shapes["double"][s]) for i in range(depth) for s in sites["double"]]
        names += [(f"single_transformer_blocks.{i}.{s}", shapes["single"][s]) for i in range(depth_single)
                  for s in sites["single"]]
        for name, (din, dout) in names:
            out[f"transformer.{name}.lora_A.weight"] = rnd(rank, din, std=din ** -0.5)
            out[f"transformer.{name}.lora_B.weight"] = rnd(dout, rank, std=0.002)
            if bias:
                out[f"transformer.{name}.lora_B.bias"] = rnd(dout, std=0.002)
        return out

    def embedder(prefix: str) -> dict:
        r = embedder_rank
        return {f"{prefix}redux_up_lora_A.weight": rnd(r, siglip, std=siglip ** -0.5),
                f"{prefix}redux_up_lora_B.weight": rnd(3 * joint, r, std=0.002),
                f"{prefix}redux_up_lora_B.bias": rnd(3 * joint, std=0.002),
                f"{prefix}redux_down_lora_A.weight": rnd(r, 3 * joint, std=(3 * joint) ** -0.5),
                f"{prefix}redux_down_lora_B.weight": rnd(joint, r, std=0.002),
                f"{prefix}redux_down_lora_B.bias": rnd(joint, std=0.002),
                f"{prefix}gate_proj.weight": rnd(1, joint, std=joint ** -0.5),
                f"{prefix}gate_proj.bias": rnd(1, std=0.1)}

    router = embedder("router_embedder.")
    for kind, n in (("transformer_blocks", depth), ("single_transformer_blocks", depth_single)):
        for i in range(n):
            for qk in ("q", "k"):
                p = f"transformer.{kind}.{i}.attn.processor.to_{qk}_routing_map_lora"
                router[f"{p}_A.weight"] = rnd(routing_rank, hidden, std=hidden ** -0.5)
                router[f"{p}_B.weight"] = rnd(hidden, routing_rank, std=0.02)
                router[f"{p}_B.bias"] = rnd(hidden, std=0.02)
    router.update(peft(ROUTER_SITES, bias=True))
    return {"ref": peft(REF_SITES, bias=False), "redux": embedder(""), "router": router}
