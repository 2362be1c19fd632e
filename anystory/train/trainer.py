"""The router trainer (AnyStory stage 2): what is trained, one training step, the resumable state.

Trained: the routing QFormer (``routing_proj``, one query → R_i) and the per-layer routers (``router.{N}`` →
M_i^l); frozen: the SDXL UNet, CLIP-H, the subject QFormer (→ E_i) and the per-layer Ŵ_k^l / Ŵ_v^l.
:func:`attach_router` gives a subject-branch adapter its router; :class:`RouterTrainer` (an ``nn.Module``
holding only the trainables, DDP-wrappable) runs one UNet call with routing active (``hooks``) on x_t, the
target latent noised at a random timestep t of the ε schedule (:func:`sdxl_alphas_cumprod` /
:func:`alphas_cumprod_from_sigmas`), and returns loss = ε-MSE + λ·L_route; :func:`train_step` is one AdamW
step with warm-up and clipping. The training state (trainables, optimizer, step, RNG) is saved atomically
with ``torch.save`` and read back with ``weights_only=True``; :class:`StepBatches` and :func:`step_seed`
make a resumed run see the same data and noise as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from ..adapter import KIND_NATIVE, AnyStoryAdapter
from ..checkpoint.io import atomic_write
from ..layers import LayerLayout, discover_layout, transformer_blocks
from ..paper.encoder import ZERO_IMAGE_NORMALISED, Resampler, zero_image_pixels, zero_image_rgb
from ..paper.router import LayerRouter
from .augment import CLIP_SIZE, AugmentConfig, reference_views
from .data import DatasetError, TrainSample
from .hooks import (
    RoutingState,
    TrainReferenceAttn1,
    TrainRoutedAttn2,
    TrainRouterPatch,
    gradient_checkpointing,
    transformer_options,
)
from .reference import capture_reference_features, reference_latents

TRAIN_STATE_FORMAT = "anystory-router-train"
TRAIN_STATE_VERSION = 1


# ================================================================================================
# the noise schedule
# ================================================================================================
def sdxl_alphas_cumprod(timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t of SDXL's ε schedule ("scaled linear": β = linspace(√β0, √β1)², 1000 steps), float64 —
    the same ComfyUI's ModelSamplingDiscrete builds (σ_t = √((1 − ᾱ_t)/ᾱ_t))."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = 1 / (1 + σ_t²) (from a ComfyUI model_sampling's ``sigmas``)."""
    return 1.0 / (1.0 + sigmas.double() ** 2)


# ================================================================================================
# the adapter: add a trainable router
# ================================================================================================
def attach_router(adapter: AnyStoryAdapter, router_dim: int = 256, router_heads: int = 4, seed: int = 0,
                  init_routing_from_subject: bool = True) -> AnyStoryAdapter:
    """Give ``adapter`` a routing QFormer and per-layer routers (in place) unless it has them, and
    freeze everything else. Returns the adapter (kind native from now on).

    The routing QFormer has the subject QFormer's architecture with one query. With
    ``init_routing_from_subject`` it starts as a copy of the subject QFormer whose single query is the
    mean of the subject queries (R_i then starts as a summary of E_i, not noise). Routers start with
    PyTorch's default init except ``refine_out`` = 0 (the refinement starts as the identity).
    Trainables are float32."""
    if not adapter.has_router:
        sp = adapter.subject_proj
        cfg = dict(sp.config, num_queries=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rp = Resampler(**cfg)
            if init_routing_from_subject:
                sd = {k: v.detach().float().clone() for k, v in sp.state_dict().items()}
                sd["latents"] = sd["latents"].mean(1, keepdim=True)
                rp.load_state_dict(sd)
            route_dim = sp.output_dim
            router = nn.ModuleDict({str(n): LayerRouter(c, route_dim, router_dim, router_heads)
                                    for n, c in sorted(adapter.layer_dims.items())})
            for r in router.values():
                nn.init.zeros_(r.refine_out.weight)
                nn.init.zeros_(r.refine_out.bias)
        dev = sp.proj_in.weight.device
        adapter.routing_proj = rp.to(dev)
        adapter.router = router.to(dev)
        adapter.router_dim = router_dim
        adapter.router_heads = router_heads
        if adapter.kind != KIND_NATIVE:
            adapter.meta = dict(adapter.meta, derived_from=adapter.kind)
            adapter.kind = KIND_NATIVE
    adapter.requires_grad_(False)
    adapter.routing_proj.float().requires_grad_(True)
    adapter.router.float().requires_grad_(True)
    return adapter


def trainable_state(adapter: AnyStoryAdapter) -> dict:
    """The trained part of the adapter (routing_proj.* + router.*), detached CPU tensors."""
    return {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()
            if k.startswith(("routing_proj.", "router."))}


def export_adapter(adapter: AnyStoryAdapter, dtype: Optional[torch.dtype] = None) -> AnyStoryAdapter:
    """A CPU copy of the adapter for :func:`anystory.checkpoint.save_adapter`, all in one dtype
    (default: the subject QFormer's, e.g. fp16 for an IP-Adapter file)."""
    dtype = dtype or adapter.subject_proj.proj_in.weight.dtype
    out = copy.deepcopy(adapter).to("cpu", dtype).eval().requires_grad_(False)
    return out


# ================================================================================================
# configuration, batch, the trainer module
# ================================================================================================
@dataclass
class TrainConfig:
    lr: float = 1e-4
    routing_proj_lr: Optional[float] = None   # learning rate of the routing QFormer (None: lr)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    routing_weight: float = 0.1           # λ
    routing_reduction: str = "sum"        # over a layer's h·w tokens: "sum" (eq. 4's squared norm) or "mean"
    tau: float = 1.0                      # Gumbel-softmax temperature
    eta: float = 1.0                      # η of eq. 5 during training
    grad_clip: float = 1.0
    mixed_precision: str = "no"           # "no" | "bf16" | "fp16"
    grad_checkpointing: bool = False
    prediction: str = "eps"               # "eps" | "v"
    timestep_range: tuple = (0, 1000)
    seed: int = 0
    reference: str = "off"                # the reference branch (eq. 6-8): "off" | "native" | "shared"
    ref_size: int = 512                   # side of the reference views the ReferenceNet sees
    condition_dropout: float = 0.1        # stage 1: share of samples whose CLIP image condition is dropped

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["timestep_range"] = list(self.timestep_range)
        return d


AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Encoders:
    """The frozen encoders, as callables (no_grad is applied by the caller).

    clip: images [B, 224, 224, 3] in 0..1 → CLIP-H penultimate hidden states [B, 257, 1280];
    vae: images [B, H, W, 3] in 0..1 → latents [B, 4, H/8, W/8] already scaled for the UNet;
    text: (captions, (H, W)) → (context [B, 77, 2048], y [B, adm] or None);
    zero_image: the background route's zero image (``anystory.paper.encoder.ZERO_IMAGES``; the subject
    branch's, ``AnyStoryAdapter.zero_image``), written into the trained file;
    clip_pixels: already-normalised pixel values [B, 3, 224, 224] → the same features as ``clip`` (the
    model call without the preprocessing): the zero image's features are made from its exact pixel values
    (:func:`~anystory.paper.encoder.zero_image_pixels`); None: ``clip`` of the pixel image that normalises
    to them (:func:`~anystory.paper.encoder.zero_image_rgb`)."""

    clip: Callable
    vae: Optional[Callable] = None
    text: Optional[Callable] = None
    zero_image: str = ZERO_IMAGE_NORMALISED
    clip_pixels: Optional[Callable] = None
    _bg: Optional[torch.Tensor] = None

    def background(self) -> torch.Tensor:
        """F_clip of the zero image (the background route N+1), computed once."""
        if self._bg is None:
            with torch.no_grad():
                if self.clip_pixels is not None:
                    bg = self.clip_pixels(zero_image_pixels(self.zero_image, CLIP_SIZE))
                else:
                    bg = self.clip(zero_image_rgb(self.zero_image, CLIP_SIZE))
                self._bg = bg.detach()
        return self._bg


@dataclass
class BatchInputs:
    x0: torch.Tensor                 # [B, 4, h, w]
    context: torch.Tensor            # [B, T, 2048]
    y: Optional[torch.Tensor]        # [B, adm]
    clip_feats: list                 # B × [N_b, 257, D]
    clip_bg: torch.Tensor            # [1, 257, D]
    masks: list                      # B × [N_b, H, W]
    names: list
    ref_latents: Optional[list] = None  # B × [N_b, 4, h, w]: the reference views for the ReferenceNet

    def to(self, device) -> "BatchInputs":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        refs = None if self.ref_latents is None else [mv(r) for r in self.ref_latents]
        return BatchInputs(mv(self.x0), mv(self.context), mv(self.y), [mv(f) for f in self.clip_feats],
                           mv(self.clip_bg), [mv(m) for m in self.masks], list(self.names), refs)


@torch.no_grad()
def encode_targets(samples: Sequence[TrainSample], encoders: Encoders, cache: Optional[dict] = None) -> list:
    """(latent [4, h, w], context [T, 2048], y [adm] or None) per sample, from ``cache`` (keyed by sample.key)
    or the frozen VAE/text encoders (then stored in the cache). CPU tensors."""
    cache = {} if cache is None else cache
    todo = [s for s in samples if s.key not in cache]
    if todo:
        if encoders.vae is None or encoders.text is None:
            raise ValueError("encode_targets needs encoders.vae and encoders.text (or a filled cache)")
        lat = encoders.vae(torch.stack([s.image for s in todo])).detach().float().cpu()
        H, W = todo[0].image.shape[:2]
        ctx, y = encoders.text([s.caption for s in todo], (H, W))
        for i, s in enumerate(todo):
            cache[s.key] = (lat[i], ctx[i].detach().cpu(), None if y is None else y[i].detach().cpu())
    return [cache[s.key] for s in samples]


@torch.no_grad()
def prepare_batch(samples: Sequence[TrainSample], encoders: Encoders, gen: Optional[torch.Generator] = None,
                  augment: bool = True, aug: AugmentConfig = AugmentConfig(),
                  cache: Optional[dict] = None, ref_size: Optional[int] = None) -> BatchInputs:
    """Everything the trainer needs for a batch, from the frozen encoders: latents and text conditioning
    (cached per sample name), the instances' reference views through CLIP (augmented in training), the
    background route's CLIP features and the instance masks; with ``ref_size`` also the same views at that
    size through the VAE for the ReferenceNet (the reference branch)."""
    cache = {} if cache is None else cache
    enc = encode_targets(samples, encoders, cache)
    views = [reference_views(s, gen, augment, aug) for s in samples]
    counts = [v.shape[0] for v in views]
    allv = torch.cat(views) if sum(counts) else None
    feats = encoders.clip(allv).detach() if allv is not None else None
    per, o = [], 0
    bg = encoders.background()
    for c in counts:
        per.append(feats[o:o + c] if c else bg.new_zeros(0, *bg.shape[1:]))
        o += c
    y = None if enc[0][2] is None else torch.stack([e[2] for e in enc])
    refs = None
    if ref_size:
        if encoders.vae is None:
            raise ValueError("the reference branch needs encoders.vae (reference latents)")
        lat = reference_latents(allv, encoders.vae, ref_size).cpu() if allv is not None else None
        refs = [lat[sum(counts[:i]):sum(counts[:i + 1])] if c else torch.zeros(0, 4, ref_size // 8, ref_size // 8)
                for i, c in enumerate(counts)]
    return BatchInputs(torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc]), y, per, bg,
                       [s.masks for s in samples], [s.name for s in samples], refs)


REFERENCE_MODES = ("off", "native", "shared")


class ReferenceBranch:
    """The reference branch of a training step (eq. 6-8): the ReferenceNet pass on the batch's reference
    latents → G_i^l per row (:func:`~.reference.capture_reference_features`) and the attn1 replaces that
    attend to them (:class:`~.hooks.TrainReferenceAttn1`, every layer but the first).

    mode "native": ``refnet`` (a UNet without cross-attention; trained when its parameters require grad);
    "shared": the frozen denoising UNet itself, its cross-attention zeroed for the pass."""

    def __init__(self, unet: nn.Module, adapter: AnyStoryAdapter, layout: LayerLayout, mode: str,
                 refnet: Optional[nn.Module] = None):
        if mode not in REFERENCE_MODES or mode == "off":
            raise ValueError(f"reference mode must be 'native' or 'shared', got {mode!r}")
        if mode == "native" and refnet is None:
            raise ValueError("reference mode 'native' needs a ReferenceNet module")
        self.mode = mode
        self.refnet = refnet if mode == "native" else unet
        blocks = transformer_blocks(unet)
        specs = list(layout)
        self.replaces = {s.key: TrainReferenceAttn1(adapter, s, p.key, getattr(blocks.get(s.key), "attn1", None))
                         for p, s in zip(specs, specs[1:])}
        attn2 = next((tb.attn2 for tb in blocks.values() if getattr(tb, "attn2", None) is not None), None)
        self.context_dim = int(attn2.to_k.weight.shape[1]) if attn2 is not None else 2048
        label = getattr(unet, "label_emb", None)
        self.adm = int(label[0][0].in_features) if getattr(unet, "num_classes", None) is not None else None

    def features(self, ref_latents: Optional[list]) -> Optional[list]:
        """Per row {layer key: G^l [N_b, L_ref, C]} (None for a row without instances); gradients flow
        into a ReferenceNet that trains."""
        if ref_latents is None:
            raise ValueError("the reference branch needs the batch's reference latents (prepare_batch ref_size=)")
        counts = [x.shape[0] for x in ref_latents]
        if not sum(counts):
            return [None] * len(counts)
        x = torch.cat([x for x in ref_latents if x.shape[0]])
        trains = any(p.requires_grad for p in self.refnet.parameters())
        with torch.no_grad() if not trains else contextlib.nullcontext():
            feats = capture_reference_features(self.refnet, x, shared=self.mode == "shared",
                                               context_dim=self.context_dim, adm=self.adm)
        out, o = [], 0
        for c in counts:
            out.append({k: f[o:o + c] for k, f in feats.items()} if c else None)
            o += c
        return out


class _DiffusionTrainer(nn.Module):
    """What both stages share: the noise schedule, x_t and the target, one UNet call with the training hooks
    under autocast (and gradient checkpointing), the ε/v MSE."""

    def _setup(self, unet: nn.Module, adapter: AnyStoryAdapter, config: TrainConfig,
               alphas_cumprod: Optional[torch.Tensor], layout: Optional[LayerLayout], refnet: Optional[nn.Module]):
        self._frozen = (unet, adapter)          # a tuple: not registered (DDP must not touch them)
        unet.requires_grad_(False)              # the UNet is frozen in both stages
        self.config = config
        self.layout = layout or discover_layout(unet)
        adapter.check_layout(self.layout, "the UNet")
        ac = alphas_cumprod if alphas_cumprod is not None else sdxl_alphas_cumprod()
        self.register_buffer("alphas_cumprod", ac.double().clone(), persistent=False)
        self.references = (None if config.reference == "off"
                           else ReferenceBranch(unet, adapter, self.layout, config.reference, refnet))

    @property
    def unet(self) -> nn.Module:
        return self._frozen[0]

    @property
    def adapter(self) -> AnyStoryAdapter:
        return self._frozen[1]

    def _autocast(self, device):
        dt = AUTOCAST[self.config.mixed_precision]
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=dt)

    def _noised(self, x0: torch.Tensor, t: Optional[torch.Tensor], noise: Optional[torch.Tensor]):
        """(x_t, t, target) at timesteps t (random in the configured range when None)."""
        cfg = self.config
        dev, B = x0.device, x0.shape[0]
        if noise is None:
            noise = torch.randn_like(x0, dtype=torch.float32)
        if t is None:
            lo, hi = cfg.timestep_range
            t = torch.randint(int(lo), int(hi), (B,), device=dev)
        t = t.to(dev).long()
        ac = self.alphas_cumprod.to(dev)[t].float().view(B, 1, 1, 1)
        x_t = ac.sqrt() * x0.float() + (1 - ac).sqrt() * noise.float()
        target = noise.float() if cfg.prediction == "eps" else ac.sqrt() * noise.float() - (1 - ac).sqrt() * x0.float()
        return x_t, t, target

    def _run(self, batch: BatchInputs, t, noise, make_state: Callable, patch, replaces: dict) -> tuple:
        """(diffusion loss, state): one UNet call on x_t with the hooks; ``make_state(refs)`` builds the
        RoutingState inside autocast (the routes' encoders run there)."""
        cfg, unet = self.config, self.unet
        x_t, t, target = self._noised(batch.x0, t, noise)
        wdtype = next(unet.parameters()).dtype
        with self._autocast(batch.x0.device):
            refs = self.references.features(batch.ref_latents) if self.references is not None else None
            state = make_state(refs)
            attn1 = self.references.replaces if self.references is not None else None
            opts = transformer_options(patch, replaces, state, attn1)
            y = batch.y.to(wdtype) if batch.y is not None else None
            with gradient_checkpointing(unet, cfg.grad_checkpointing and torch.is_grad_enabled()):
                pred = unet(x_t.to(wdtype), timesteps=t.float(), context=batch.context.to(wdtype), y=y,
                            transformer_options=opts)
        return F.mse_loss(pred.float(), target), state


class RouterTrainer(_DiffusionTrainer):
    """Stage 2. The trainable part (routing QFormer + routers, registered as submodules: what DDP
    synchronises) and a reference to the frozen UNet and adapter. ``forward(batch)`` = one UNet call with
    routing active (and, with ``config.reference`` on, the reference attention of a frozen ReferenceNet /
    the shared UNet, as the paper trains the router) + losses; returns ``{"loss", "diffusion", "routing",
    "state"}``."""

    def __init__(self, unet: nn.Module, adapter: AnyStoryAdapter, config: TrainConfig = TrainConfig(),
                 alphas_cumprod: Optional[torch.Tensor] = None, layout: Optional[LayerLayout] = None,
                 refnet: Optional[nn.Module] = None):
        super().__init__()
        if not adapter.has_router:
            raise ValueError("RouterTrainer needs an adapter with a router: call attach_router(adapter) first")
        self.routing_proj = adapter.routing_proj
        self.router = adapter.router
        if refnet is not None:
            refnet.requires_grad_(False)  # frozen in stage 2 (not a registered submodule either)
        self._setup(unet, adapter, config, alphas_cumprod, layout, refnet)
        self.patch = TrainRouterPatch(adapter, self.layout)
        self.replaces = {spec.key: TrainRoutedAttn2(adapter, spec) for spec in self.layout}

    def encode_routes(self, clip_feats: list, clip_bg: torch.Tensor) -> tuple:
        """Per sample E [N_b+1, m, 2048] (frozen subject QFormer, no grad) and R [N_b+1, 2048] (routing
        QFormer, with grad); the last route is the background (the zero image)."""
        counts = [f.shape[0] for f in clip_feats]
        x = torch.cat(list(clip_feats) + [clip_bg.to(clip_feats[0] if clip_feats else clip_bg)], 0)
        sp = self.adapter.subject_proj
        with torch.no_grad():
            E_all = sp(x.to(sp.proj_in.weight.dtype))
        R_all = self.routing_proj(x.to(self.routing_proj.proj_in.weight.dtype))[:, 0]
        E, R, o = [], [], 0
        for c in counts:
            E.append(torch.cat([E_all[o:o + c], E_all[-1:]]))
            R.append(torch.cat([R_all[o:o + c], R_all[-1:]]))
            o += c
        return E, R

    def forward(self, batch: BatchInputs, t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                mode: str = "train") -> dict:
        cfg = self.config

        def make_state(refs):
            E, R = self.encode_routes(batch.clip_feats, batch.clip_bg)
            return RoutingState(E, R, batch.masks, mode=mode, tau=cfg.tau, eta=cfg.eta, refs=refs,
                                reduction=cfg.routing_reduction)

        diffusion, state = self._run(batch, t, noise, make_state, self.patch, self.replaces)
        routing = state.routing_loss().to(diffusion)
        loss = diffusion + cfg.routing_weight * routing
        return {"loss": loss, "diffusion": diffusion.detach(), "routing": routing.detach(), "state": state}


def make_optimizer(trainer: RouterTrainer, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainables: the routers at ``lr``, the routing QFormer at ``routing_proj_lr``."""
    qf = [p for p in trainer.routing_proj.parameters() if p.requires_grad]
    rt = [p for p in trainer.router.parameters() if p.requires_grad]
    qlr = config.lr if config.routing_proj_lr is None else config.routing_proj_lr
    return torch.optim.AdamW([{"params": rt, "lr": config.lr, "base_lr": config.lr, "name": "router"},
                              {"params": qf, "lr": qlr, "base_lr": qlr, "name": "routing_proj"}],
                             lr=config.lr, weight_decay=config.weight_decay)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The RNG seed of one (step, rank): noise, timesteps, Gumbel noise and augmentation are drawn from
    it, so a resumed run continues exactly as an uninterrupted one, and ranks draw differently."""
    return (int(seed) * 1_000_003 + int(step) * 7919 + int(rank) * 104_729) % (2 ** 62)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: BatchInputs, config: TrainConfig,
               step: int, scaler=None) -> dict:
    """One optimisation step on ``model`` (a :class:`RouterTrainer` or its DDP wrapper): forward, backward
    (through ``scaler`` for fp16), clip, AdamW step with linear warm-up. Returns float losses and the
    gradient norm."""
    scale = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    for g in optimizer.param_groups:
        g["lr"] = g.get("base_lr", config.lr) * scale
    lr = config.lr * scale
    optimizer.zero_grad(set_to_none=True)
    out = model(batch)
    loss = out["loss"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return {"loss": float(loss.detach()), "diffusion": float(out["diffusion"]), "routing": float(out["routing"]),
            "grad_norm": float(gn), "lr": lr}


# ================================================================================================
# resumable training state
# ================================================================================================
def save_training_state(path, adapter: AnyStoryAdapter, optimizer: torch.optim.Optimizer, step: int,
                        config: Optional[TrainConfig] = None, scaler=None, extra: Optional[dict] = None) -> None:
    """Write {routing_proj, router, optimizer, step, scaler, config, rng} with ``torch.save`` (tensors and
    plain Python values only — :func:`load_training_state` reads it with ``weights_only=True``),
    atomically (temp file + rename)."""
    sd = trainable_state(adapter)
    state = {
        "format": TRAIN_STATE_FORMAT, "version": TRAIN_STATE_VERSION, "step": int(step),
        "routing_proj": {k[len("routing_proj."):]: v for k, v in sd.items() if k.startswith("routing_proj.")},
        "router": {k[len("router."):]: v for k, v in sd.items() if k.startswith("router.")},
        "router_dim": int(adapter.router_dim), "router_heads": int(adapter.router_heads),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "config": config.as_dict() if config is not None else {},
        "rng": {"torch": torch.get_rng_state(), "scheme": "per-step seeds (step_seed)",
                "seed": int(config.seed) if config is not None else 0},
        "extra": dict(extra or {}),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path) -> dict:
    """Read a training state written by :func:`save_training_state` (``weights_only=True``)."""
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{path} is not an AnyStory router training state (format {TRAIN_STATE_FORMAT})")
    if int(state.get("version", 0)) > TRAIN_STATE_VERSION:
        raise ValueError(f"{path}: training state version {state['version']} is newer than this code "
                         f"({TRAIN_STATE_VERSION})")
    return state


def restore_training_state(state: dict, adapter: AnyStoryAdapter, optimizer: Optional[torch.optim.Optimizer] = None,
                           scaler=None) -> int:
    """Load the trained weights (and optimizer / scaler) from ``state`` into a router-attached adapter;
    returns the step to continue from."""
    if (int(state["router_dim"]), int(state["router_heads"])) != (adapter.router_dim, adapter.router_heads):
        raise ValueError(f"the training state has router_dim={state['router_dim']} heads={state['router_heads']}, "
                         f"the adapter {adapter.router_dim}/{adapter.router_heads}")
    adapter.routing_proj.load_state_dict(state["routing_proj"])
    adapter.router.load_state_dict(state["router"])
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


# ================================================================================================
# data order (epochs over a DistributedSampler, resumable by step)
# ================================================================================================
class _Sized:
    """What DistributedSampler needs of a dataset: its length."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class StepBatches:
    """Batches of dataset indices for steps ``start, start+1, …``: epoch e is a DistributedSampler
    permutation (seed, epoch; this rank's share), cut into batches of ``batch_size`` (the last,
    incomplete one dropped). Step s is batch s mod per_epoch of epoch s // per_epoch, so resuming at a
    step gives exactly the data an uninterrupted run would have seen."""

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.sampler = DistributedSampler(_Sized(dataset_len), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed, drop_last=False)
        self.batch_size = int(batch_size)
        per_rank = len(self.sampler)
        if per_rank < self.batch_size:
            raise DatasetError(f"{dataset_len} training image(s) over {world_size} process(es) give {per_rank} per "
                               f"process, fewer than the batch size {self.batch_size}")
        self.per_epoch = per_rank // self.batch_size

    def batch(self, step: int) -> list:
        epoch, b = divmod(int(step), self.per_epoch)
        self.sampler.set_epoch(epoch)
        idx = list(iter(self.sampler))
        return idx[b * self.batch_size:(b + 1) * self.batch_size]
