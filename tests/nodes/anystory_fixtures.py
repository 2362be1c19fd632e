"""Shared in-process set-up for the node tests (test_apply.py, test_encode.py, test_preview_node.py).

Everything runs through the pack's own node classes against REAL ComfyUI samplers, on a tiny
SDXL-family model (``comfy_harness.tiny_sdxl(context_dim=2048)``: ``comfy.model_base.SDXL``, 7
transformer blocks) with a random AnyStory adapter made for the layout discovered from that UNet.
CLIP vision and the VAE are small stand-ins with ComfyUI's interfaces (``encode_image(images, crop)``
→ ``comfy.clip_vision.Output`` with ``penultimate_hidden_states`` [B, 257, 1280]; ``encode(pixels)`` →
a 4-channel latent at 1/8 resolution).

No ComfyUI import at module level: collection must work where ComfyUI is absent. Test modules load
this file by location (pytest runs with ``--import-mode=importlib``, so tests/nodes is not on
sys.path) and re-export the fixtures they use.

Core modules are taken from the pack as ComfyUI imported it (``comfyui_anystory.anystory.*``), never
from the top-level ``anystory`` package that tests/conftest.py registers (different class objects).
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from dataclasses import dataclass, field
from typing import Optional

import pytest

CTX = 2048          # SDXL text context width (makes the tiny model SDXL-family for the pack)
CLIP_H = 1280       # CLIP ViT-H/14 hidden width
TINY_TOKENS = 4     # m, subject tokens per route of the random adapter

# layer key of the tiny model → its width C (64 = 1/2 latent grid, 128 = 1/4)
TINY_KEYS = [("input", 3, 0), ("input", 5, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0),
             ("output", 2, 0), ("output", 3, 0)]


def pack_mod(sub: str):
    """A pack submodule as the pack imported it, e.g. ``pack_mod("anystory.synthetic")``."""
    return importlib.import_module(f"comfyui_anystory.{sub}")


def node(pack, name: str):
    return pack.NODE_CLASS_MAPPINGS[name]()


def pack_error():
    """The pack's AnyStoryError class (as loaded by the harness)."""
    return pack_mod("nodes.types").AnyStoryError


def raises_pack_error(fn, *needles) -> str:
    """fn() raises AnyStoryError whose message contains every needle (case-insensitive); the message."""
    with pytest.raises(pack_error()) as ei:
        fn()
    msg = str(ei.value)
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in message: {msg}"
    return msg


def ceil_half(n: int, times: int) -> int:
    for _ in range(times):
        n = -(-n // 2)
    return n


def tiny_grid(key_dim: int, latent_hw: tuple) -> tuple:
    """Token grid of a tiny-model layer of width 64 (1/2) or 128 (1/4) for a latent (h, w): the UNet's
    stride-2 convolutions halve with ceil."""
    times = {64: 1, 128: 2}[key_dim]
    return ceil_half(latent_hw[0], times), ceil_half(latent_hw[1], times)


# ------------------------------------------------------------------------------------------------
# stand-ins for CLIP vision and the VAE (ComfyUI's interfaces, tiny compute)
# ------------------------------------------------------------------------------------------------
class FakeClipVision:
    """``comfy.clip_vision.ClipVisionModel``-like: ``encode_image(images [B,H,W,3], crop)`` →
    ``Output`` with ``penultimate_hidden_states`` [B, 257, width] (16×16 pooled patches + a CLS-like mean
    token through a fixed random projection); ``patcher`` is a real ModelPatcher."""

    def __init__(self, width: int = CLIP_H, seed: int = 0):
        import torch

        import comfy.model_patcher

        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Linear(3, width)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(width, 3, generator=g))
            self.proj.bias.copy_(0.1 * torch.randn(width, generator=g))
        self.patcher = comfy.model_patcher.ModelPatcher(self.proj, torch.device("cpu"), torch.device("cpu"))
        self.seen: list = []  # the images it was asked to encode

    def encode_image(self, image, crop=True):
        import torch

        import comfy.clip_vision

        self.seen.append(image.detach().clone())
        x = torch.nn.functional.adaptive_avg_pool2d(image[..., :3].permute(0, 3, 1, 2).float(), 16)
        x = x.flatten(2).transpose(1, 2)  # [B, 256, 3]
        x = torch.cat([x.mean(1, keepdim=True), x], 1)
        out = comfy.clip_vision.Output()
        with torch.no_grad():
            out["penultimate_hidden_states"] = torch.tanh(self.proj(x * 2 - 1))
        return out


class FakeVAE:
    """``comfy.sd.VAE``-like ``encode(pixels [B,H,W,3])`` → [B, 4, H/8, W/8]."""

    def __init__(self):
        import torch
        self.mix = torch.tensor([[1.0, 0.2, -0.3], [-0.5, 1.0, 0.1], [0.3, -0.7, 1.0], [0.4, 0.4, 0.4]])
        self.seen: list = []

    def encode(self, pixels):
        import torch
        self.seen.append(pixels.detach().clone())
        x = torch.nn.functional.avg_pool2d(pixels[..., :3].permute(0, 3, 1, 2).float() * 2 - 1, 8)
        return torch.einsum("oc,bchw->bohw", self.mix, x)


# ------------------------------------------------------------------------------------------------
# the environment: tiny model, adapters, stand-ins, conditioning
# ------------------------------------------------------------------------------------------------
def make_anystory(layout, kind: str = "anystory-sdxl", seed: int = 0, name: Optional[str] = None,
                  clip_dim: int = CLIP_H, meta_device: bool = False, reference_proj=None):
    """An ANYSTORY value (``nodes.types.AnyStoryModel``) with a random adapter for ``layout``, wrapped
    in a ModelPatcher as AnyStoryModelLoader does. ``meta_device``: weights on the meta device (for
    refusal tests of layouts too big to materialise; no patcher then); ``reference_proj``: the file's W̃_k^l,
    W̃_v^l ("all" or a list of layers N, see anystory.synthetic.random_adapter)."""
    import torch

    import comfy.model_patcher

    synthetic = pack_mod("anystory.synthetic")
    types_ = pack_mod("nodes.types")
    kw = dict(kind=kind, clip_dim=clip_dim, qformer_dim=64, depth=1, num_tokens=TINY_TOKENS, router_dim=32,
              router_heads=2, seed=seed, reference_proj=reference_proj)
    if meta_device:
        with torch.device("meta"):
            adapter_mod = pack_mod("anystory.adapter")
            encoder = pack_mod("anystory.paper.encoder")
            subject = encoder.Resampler(dim=64, depth=1, heads=1, num_queries=TINY_TOKENS, embedding_dim=clip_dim)
            ad = adapter_mod.AnyStoryAdapter(subject, {s.ckpt_index: s.dim for s in layout}, kind=kind)
        return types_.AnyStoryModel(name or f"meta-{kind}", ad, None)
    ad = synthetic.random_adapter(layout, **kw).eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(ad, torch.device("cpu"), torch.device("cpu"))
    return types_.AnyStoryModel(name or f"random-{kind}-{seed}", ad, patcher)


def subject_image(color=(0.9, 0.2, 0.1), size=(96, 64), seed: int = 0):
    """[1, H, W, 3]: a coloured blob on a textured background (some structure for the encoders)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    h, w = size
    img = 0.3 * torch.rand(1, h, w, 3, generator=g) + 0.35
    img[:, h // 5:4 * h // 5, w // 6:5 * w // 6] = torch.tensor(color)
    return img


def half_masks(size=(128, 128)):
    """Region masks [2, H, W]: subject 1 = left half, subject 2 = right half."""
    import torch
    h, w = size
    m = torch.zeros(2, h, w)
    m[0, :, : w // 2] = 1
    m[1, :, w // 2:] = 1
    return m


@dataclass
class Env:
    harness: object
    pack: object
    model: object                 # tiny SDXL ModelPatcher (fp32 unless asked)
    layout: object
    am: object                    # native AnyStory (router) model
    clip: FakeClipVision
    vae: FakeVAE
    pos: list
    neg: list
    subjects: object = None       # 2 subjects, shared references (MODEL connected)
    subjects_noref: object = None  # 2 subjects, reference off
    masks: object = None          # half masks
    extra: dict = field(default_factory=dict)

    def encode(self, image, am=None, mask=None, subjects=None, label="", strength=1.0, reference="auto",
               model="default", clip=None, **kw):
        model = self.model if model == "default" else model
        res = node(self.pack, "AnyStorySubjectEncode").encode(
            am or self.am, clip or self.clip, self.vae, image, mask=mask, model=model, subjects=subjects,
            label=label, strength=strength, reference=reference, **kw)
        return res

    def apply(self, subjects=None, am=None, model=None, router_mode="masks", eta=1.0, gamma=1.0,
              start_percent=0.0, end_percent=1.0, region_masks="default", record_routing=True, **options):
        """``options``: further AnyStoryApply inputs by name (e.g. negative_rows)."""
        masks = self.masks if isinstance(region_masks, str) and region_masks == "default" else region_masks
        return node(self.pack, "AnyStoryApply").apply(
            model or self.model, am or self.am, subjects or self.subjects, router_mode, eta, gamma, start_percent,
            end_percent, region_masks=masks, record_routing=record_routing, **options)

    def sample(self, model, latent, steps=2, cfg=5.0, sampler="euler", scheduler="normal", seed=0, pos=None,
               neg=None):
        return self.harness.sample(model, pos or self.pos, neg or self.neg, latent, steps=steps, cfg=cfg,
                                   sampler=sampler, scheduler=scheduler, seed=seed)


def build_env(harness, pack, dtype=None, seed: int = 0, with_subjects: bool = True) -> Env:
    import torch

    model = harness.tiny_sdxl(seed=seed, dtype=dtype, context_dim=CTX)
    layout = pack_mod("anystory.layers").discover_layout(model.model.diffusion_model)
    assert [s.key for s in layout] == TINY_KEYS
    am = make_anystory(layout, seed=seed)
    env = Env(harness, pack, model, layout, am, FakeClipVision(), FakeVAE(),
              harness.tiny_cond(ctx=CTX, seed=100), harness.tiny_cond(ctx=CTX, seed=101), masks=half_masks())
    if with_subjects:
        s1 = env.encode(subject_image((0.9, 0.2, 0.1), seed=1), label="the cat")["result"][0]
        env.subjects = env.encode(subject_image((0.1, 0.3, 0.9), (64, 80), seed=2), subjects=s1,
                                  label="the dog")["result"][0]
        n1 = env.encode(subject_image((0.9, 0.2, 0.1), seed=1), label="the cat", reference="off")["result"][0]
        env.subjects_noref = env.encode(subject_image((0.1, 0.3, 0.9), (64, 80), seed=2), subjects=n1,
                                        label="the dog", reference="off")["result"][0]
        assert env.subjects.subjects[0].refs is not None and env.subjects_noref.subjects[0].refs is None
    return env


@pytest.fixture(scope="module")
def temp_dir(comfy, tmp_path_factory):
    """ComfyUI's temp folder (where the nodes' preview PNGs go) redirected to a throw-away folder."""
    fp = comfy.folder_paths
    old = fp.get_temp_directory()
    d = tmp_path_factory.mktemp("comfy-temp")
    fp.set_temp_directory(str(d))
    try:
        yield d
    finally:
        fp.set_temp_directory(old)


@pytest.fixture(scope="module")
def env(harness, pack, temp_dir):
    """Tiny fp32 SDXL-family model + native random AnyStory + two encoded subjects (module scope: the
    tests only ever patch clones of ``env.model``; test_apply checks that the input MODEL stays as is)."""
    return build_env(harness, pack)


# ------------------------------------------------------------------------------------------------
# looking inside a patched MODEL
# ------------------------------------------------------------------------------------------------
def owner_of(patched):
    """The SamplingDriver that AnyStoryApply installed on ``patched`` (found through its router patch)."""
    patches = patched.model_options.get("transformer_options", {}).get("patches", {})
    owners = [p.owner for p in patches.get("attn2_patch", []) if type(p).__name__ == "RouterPatch"]
    assert len(owners) == 1, f"expected one AnyStory router patch, found {len(owners)}"
    return owners[0]


def anystory_replaces(patched, which: str = "attn2") -> dict:
    reps = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get(which, {})
    return {k: v for k, v in reps.items() if type(v).__module__.startswith("comfyui_anystory")}


class StateProbe:
    """attn2_patch added AFTER AnyStory's router patch (so this layer's route index is already in the
    CallState): records, per UNet call and layer, what the pack decided — the chunks (row slices, cond
    flag), the route index of every row — next to ComfyUI's own view: cond_or_uncond and, per row,
    whether its text context is the positive prompt's (ground truth independent of the pack)."""

    def __init__(self, owner, pos_ctx, neg_ctx=None):
        self.owner = owner
        self.pos_ctx = pos_ctx
        self.neg_ctx = neg_ctx
        self.calls: list = []  # one dict per (UNet call, layer)

    def __deepcopy__(self, memo):
        return self

    def to(self, *a, **k):
        return self

    def __call__(self, n, context, value, extra_options):
        import torch
        state = extra_options.get(self.owner.state_key)
        b = extra_options["block"]
        key = (b[0], b[1], extra_options.get("block_index", 0))
        shape = extra_options.get("activations_shape")
        rec = {"key": key, "hw": (int(shape[-2]), int(shape[-1])) if shape is not None else None,
               "cond_or_uncond": list(extra_options.get("cond_or_uncond", [])),
               "sigma": float(extra_options["sigmas"].reshape(-1)[0]) if "sigmas" in extra_options else None,
               "row_is_pos": [bool(torch.equal(context[r].float(), self.pos_ctx[0].to(context.device).float()))
                              for r in range(context.shape[0])],
               "row_is_neg": ([bool(torch.equal(context[r].float(), self.neg_ctx[0].to(context.device).float()))
                               for r in range(context.shape[0])] if self.neg_ctx is not None else None),
               "state": state is not None}
        if state is not None:
            idx = state.index.get(key)
            rec.update(active=state.active, step=state.step,
                       chunks=[(sl.start, sl.stop, bool(c)) for sl, c in state.chunks],
                       index=None if idx is None else idx.detach().cpu().clone())
        self.calls.append(rec)
        return n, context, value

    def cond_rows(self, rec) -> list:
        rows = []
        for a, b, c in rec["chunks"]:
            rows += [c] * (b - a)
        return rows


def with_probe(patched, env: Env):
    """A clone of ``patched`` with a StateProbe after AnyStory's patches; returns (clone, probe)."""
    probe = StateProbe(owner_of(patched), env.pos[0][0], env.neg[0][0])
    m = patched.clone()
    m.set_model_attn2_patch(probe)
    return m, probe


def expected_half_index(hw: tuple, num_subjects: int = 2):
    """Route index [h·w] that the half masks give on grid hw (left → 0, right → 1, an undecided middle
    column of an odd grid → background)."""
    import torch
    h, w = hw
    col = torch.arange(w).repeat(h).float()
    mid = (w - 1) / 2
    idx = torch.full((h * w,), num_subjects, dtype=torch.long)
    idx[col < mid] = 0
    idx[col > mid] = 1
    return idx


def with_subject_e(subjects, i: int, E):
    """A copy of a SubjectList whose subject i has other tokens E_i (everything else shared)."""
    types_ = pack_mod("nodes.types")
    subs = list(subjects.subjects)
    subs[i] = dataclasses.replace(subs[i], E=E)
    return types_.SubjectList(subjects.model_uid, subjects.model_name, subs, subjects.E_bg, subjects.R_bg)
