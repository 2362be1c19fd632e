"""Stage 1 (paper §3.4): the subject encoder, trained with the UNet frozen.

Trained: the subject QFormer (``subject_proj`` → E_i), the per-layer Ŵ_k^l, Ŵ_v^l of eq. 5 (``ip_adapter.N``)
and, with the reference branch, the reference projections W̃_k^l, W̃_v^l of eq. 6-8 (``reference_proj.N``)
and the ReferenceNet (mode "native"; in mode "shared" the frozen UNet serves as ReferenceNet and only W̃
train). Frozen: the SDXL UNet, CLIP-H, the VAE, the text encoders, and the router if the adapter has one.

One step: the same data, noise schedule and diffusion loss as stage 2 (:mod:`.trainer`), with these
differences —

- no router exists yet, so every layer routes by the ground truth (:class:`~.hooks.TrainGroundTruthPatch`:
  each instance on its whole-instance mask, the background elsewhere), in eq. 5 and as M^{l-1} of eq. 6-8;
- the CLIP image condition is dropped for ``condition_dropout`` (10 %) of the samples: their instances get
  the zero image's tokens (E_{N+1}), as the background route does — the unconditional branch CFG needs;
  text and reference features are kept;
- the loss is the diffusion loss alone.

:class:`EncoderTrainer` registers exactly the trainables (what DDP synchronises); :func:`attach_stage1`
freezes the rest; :func:`save_stage1_state` / :func:`load_stage1_state` keep the resumable state.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from ..adapter import KIND_NATIVE, AnyStoryAdapter
from ..checkpoint.io import atomic_write
from ..layers import LayerLayout, discover_layout, transformer_blocks
from .hooks import RoutingState, TrainGroundTruthPatch, TrainRoutedAttn2
from .trainer import BatchInputs, TrainConfig, _DiffusionTrainer

STAGE1_STATE_FORMAT = "anystory-encoder-train"
STAGE1_STATE_VERSION = 1


def attach_stage1(adapter: AnyStoryAdapter, reference: bool, attn1: Optional[dict] = None) -> AnyStoryAdapter:
    """Make ``adapter`` a stage-1 trainee (in place): everything frozen, then the subject QFormer and Ŵ (and,
    with ``reference``, W̃ of every layer) in float32 with gradients. W̃ the file does not have start as a
    copy of the UNet's attn1 W_k^l, W_v^l (``attn1``: layer N → that attn1 module), so training starts from
    the stand-in the pack uses without them; without ``attn1``, as the identity plus a little noise. The
    adapter is native from now on."""
    adapter.requires_grad_(False)
    if reference:
        fresh = [n for n in adapter.layer_dims if adapter.reference_projection(n) is None]
        adapter.attach_reference_proj()
        with torch.no_grad():
            for n in fresh:
                proj, src = adapter.reference_proj[str(n)], (attn1 or {}).get(n)
                for name in ("to_k", "to_v"):
                    w = getattr(proj, name).weight
                    if src is not None:
                        w.copy_(getattr(src, name).weight.detach().to(w))
                    else:
                        w.copy_(torch.eye(w.shape[0], device=w.device) + 0.01 * torch.randn_like(w))
        adapter.reference_proj.float().requires_grad_(True)
    adapter.subject_proj.float().requires_grad_(True)
    adapter.ip_adapter.float().requires_grad_(True)
    if adapter.kind != KIND_NATIVE:
        adapter.meta = dict(adapter.meta, derived_from=adapter.kind)
        adapter.kind = KIND_NATIVE
    return adapter


class EncoderTrainer(_DiffusionTrainer):
    """Stage 1: the trainables as registered submodules (``subject_proj``, ``ip_adapter``, and with references
    ``reference_proj`` and, mode "native", ``refnet``) and references to the frozen UNet and adapter.
    ``forward(batch)`` = one UNet call routed by the ground truth, with condition dropout in training;
    returns ``{"loss", "diffusion", "routing" (0: no router), "state", "dropped"}``."""

    def __init__(self, unet: nn.Module, adapter: AnyStoryAdapter, config: TrainConfig = TrainConfig(),
                 alphas_cumprod: Optional[torch.Tensor] = None, layout: Optional[LayerLayout] = None,
                 refnet: Optional[nn.Module] = None):
        super().__init__()
        if config.reference == "native" and refnet is None:
            raise ValueError("stage 1 with reference 'native' trains a ReferenceNet: give one (train.make_refnet)")
        lay = layout or discover_layout(unet)
        blocks = transformer_blocks(unet)
        attn1 = {s.ckpt_index: blocks[s.key].attn1 for s in lay if s.key in blocks}
        attach_stage1(adapter, reference=config.reference != "off", attn1=attn1)
        self.subject_proj = adapter.subject_proj
        self.ip_adapter = adapter.ip_adapter
        if config.reference != "off":
            self.reference_proj = adapter.reference_proj
        if config.reference == "native":
            self.refnet = refnet.requires_grad_(True)
        self._setup(unet, adapter, config, alphas_cumprod, lay, refnet)
        self.patch = TrainGroundTruthPatch(self.layout)
        self.replaces = {spec.key: TrainRoutedAttn2(adapter, spec, trainable=True) for spec in self.layout}

    def encode_routes(self, clip_feats: list, clip_bg: torch.Tensor, dropped: list) -> list:
        """Per sample E [N_b+1, m, 2048] through the trainable subject QFormer; a dropped sample's instances
        get the zero image's features (their E_i = E_{N+1}); the last route is the background."""
        counts = [f.shape[0] for f in clip_feats]
        bg = clip_bg.to(clip_feats[0] if clip_feats else clip_bg)
        feats = [bg.expand(f.shape[0], -1, -1) if drop else f for f, drop in zip(clip_feats, dropped)]
        sp = self.subject_proj
        E_all = sp(torch.cat(feats + [bg], 0).to(sp.proj_in.weight.dtype))
        E, o = [], 0
        for c in counts:
            E.append(torch.cat([E_all[o:o + c], E_all[-1:]]))
            o += c
        return E

    def forward(self, batch: BatchInputs, t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                mode: str = "train") -> dict:
        cfg = self.config
        B = batch.x0.shape[0]
        p = cfg.condition_dropout if mode == "train" else 0.0
        dropped = (torch.rand(B) < p).tolist() if p > 0 else [False] * B

        def make_state(refs):
            E = self.encode_routes(batch.clip_feats, batch.clip_bg, dropped)
            return RoutingState(E, None, batch.masks, mode="train", eta=cfg.eta, refs=refs)

        diffusion, state = self._run(batch, t, noise, make_state, self.patch, self.replaces)
        return {"loss": diffusion, "diffusion": diffusion.detach(), "routing": torch.zeros((), device=diffusion.device),
                "state": state, "dropped": sum(dropped)}


def make_stage1_optimizer(trainer: EncoderTrainer, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the stage-1 trainables, one group per part (all at ``lr``)."""
    groups = []
    for name in ("subject_proj", "ip_adapter", "reference_proj", "refnet"):
        mod = getattr(trainer, name, None)
        params = [p for p in mod.parameters() if p.requires_grad] if mod is not None else []
        if params:
            groups.append({"params": params, "lr": config.lr, "base_lr": config.lr, "name": name})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def save_stage1_state(path, trainer: EncoderTrainer, optimizer: torch.optim.Optimizer, step: int,
                      config: Optional[TrainConfig] = None, scaler=None) -> None:
    """{trainables (the trainer's state dict), optimizer, step, scaler, config} with ``torch.save``
    (tensors and plain values: read back with ``weights_only=True``), atomically."""
    state = {"format": STAGE1_STATE_FORMAT, "version": STAGE1_STATE_VERSION, "step": int(step),
             "trainables": {k: v.detach().cpu().clone() for k, v in trainer.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
             "config": config.as_dict() if config is not None else {}}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_stage1_state(path) -> dict:
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STAGE1_STATE_FORMAT:
        raise ValueError(f"{path} is not an AnyStory stage-1 training state (format {STAGE1_STATE_FORMAT})")
    return state


def restore_stage1_state(state: dict, trainer: EncoderTrainer, optimizer=None, scaler=None) -> int:
    trainer.load_state_dict(state["trainables"])
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])
