"""The training-mode UNet hooks: routing active at every cross-attention layer l, differentiable in the
router's maps, plus gradient checkpointing of the UNet.

Per UNet call a :class:`RoutingState` holds the routes of every batch row (E_i and R_i, i = 1…N+1, the last
the background). ComfyUI's ``attn2_patch`` (:class:`TrainRouterPatch`) runs the router of layer l on
n = norm2(x) → logits → straight-through Gumbel-softmax hard maps σ(M^l) (one-hot argmax in evaluation)
and the layer's routing loss L_route against the ground-truth routes (:func:`instance_index` of the
whole-instance masks on that layer's grid, :func:`layer_routing_loss`); the attn2 replace
(:class:`TrainRoutedAttn2`) adds η·Σ_i σ(M_i^l) ⊙ Attn(Q, E_i Ŵ_k^l, E_i Ŵ_v^l) (eq. 5) to the text
attention, with Ŵ and E frozen, so the gradient reaches the router through the maps. Both follow
ComfyUI's ``transformer_options`` protocol by duck typing (no ComfyUI import).

Stage 1 (the subject encoder, :mod:`.stage1`) has no router yet: :class:`TrainGroundTruthPatch` routes by the
ground-truth instance masks instead, and :class:`TrainRoutedAttn2` then lets the gradient reach E_i and Ŵ.
The reference branch (eq. 6-8, both stages when references are on): :class:`TrainReferenceAttn1` at attn1
of every layer but the first, G_i^l projected with W̃_k^l, W̃_v^l (the UNet's attn1 where the adapter has
none), routed by M^{l-1} — the previous layer's ground truth (stage 1) or its router maps (stage 2; an
index, so no gradient reaches the router through eq. 6-8).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..adapter import AnyStoryAdapter
from ..layers import LayerLayout, block_key
from ..paper.attention import sdpa
from ..paper.injection import routed_cross_attention_sum
from ..paper.reference import project_references, routed_reference_attention
from ..paper.router import ROUTING_REDUCTIONS, gumbel_maps, one_hot_maps, resize_index, routing_loss, soft_maps

STATE_KEY = "anystory_train_state"


# ================================================================================================
# ground-truth routes and the routing loss of one layer
# ================================================================================================
def instance_index(masks: torch.Tensor, hw: tuple, threshold: float = 0.5) -> torch.Tensor:
    """Whole-instance masks [N, H, W] → the ground-truth route index [h·w] on a layer grid: the instance
    covering the largest part of a cell when that part is ≥ ``threshold``, else the background (N)."""
    n = masks.shape[0]
    h, w = int(hw[0]), int(hw[1])
    if n == 0:
        return torch.zeros(h * w, dtype=torch.long, device=masks.device)
    cov = F.interpolate(masks[None].float(), size=(h, w), mode="area")[0].flatten(1)  # [N, L]
    best, arg = cov.max(0)
    return torch.where(best >= threshold, arg, torch.full_like(arg, n))


def layer_routing_loss(logits: torch.Tensor, target_index: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """L_route of one layer for a group of samples with the same number of routes K:
    :func:`routing_loss` between softmax(logits) [b, K, L] and one-hot(target) (subjects only, 1/N; over the
    tokens a sum, eq. 4, or with ``reduction="mean"`` a mean)."""
    K = logits.shape[1]
    return routing_loss(soft_maps(logits), one_hot_maps(target_index, K), K - 1, reduction)


# ================================================================================================
# the training-mode UNet hooks (ComfyUI's transformer_options protocol, duck-typed)
# ================================================================================================
@dataclass
class RouteGroup:
    """Rows of the batch with the same number of routes K = N+1 (last = background)."""

    rows: torch.Tensor          # [b] long
    E: torch.Tensor             # [b, K, m, 2048] (frozen in stage 2, trainable graph in stage 1)
    R: Optional[torch.Tensor]   # [b, K, 2048] (trainable graph; None in stage 1: no router)
    masks: Optional[list]       # b × [N, H, W] instance masks, or None
    full: bool = False          # rows == all rows in order

    @property
    def K(self) -> int:
        return self.E.shape[1]


class RoutingState:
    """Per UNet call: the routes of every row and what the layers computed (maps for eq. 5, routing
    losses, and in eval mode the predicted / ground-truth route index per layer)."""

    def __init__(self, E: list, R: Optional[list], masks: Optional[list], mode: str = "train", tau: float = 1.0,
                 eta: float = 1.0, refs: Optional[list] = None, reduction: str = "sum"):
        """refs: per row, G^l of its subjects ({layer key: [N_b, L_ref, C]}) or None (no reference
        attention for that row); None: no reference branch. reduction: of the routing loss (eq. 4: "sum")."""
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if reduction not in ROUTING_REDUCTIONS:
            raise ValueError(f"routing loss reduction must be one of {ROUTING_REDUCTIONS}, got {reduction!r}")
        self.mode = mode
        self.reduction = reduction
        self.tau = float(tau)
        self.eta = float(eta)
        self.batch = len(E)
        by_k: dict[int, list] = {}
        for b, e in enumerate(E):
            by_k.setdefault(e.shape[0], []).append(b)
        self.groups: list[RouteGroup] = []
        for K, rows in sorted(by_k.items()):
            r = torch.tensor(rows, dtype=torch.long, device=E[0].device)
            self.groups.append(RouteGroup(r, torch.stack([E[b] for b in rows]),
                                          torch.stack([R[b] for b in rows]) if R is not None else None,
                                          [masks[b] for b in rows] if masks is not None else None,
                                          full=rows == list(range(self.batch))))
        self.order = torch.cat([g.rows for g in self.groups])
        self.inverse = torch.argsort(self.order)
        self.maps: dict = {}
        self.losses: dict = {}
        self.pred: dict = {}        # key → (hw, pred [B, L], gt [B, L] or None, K per row)
        self.refs = refs
        self.hw: dict = {}          # key → (h, w) of the layers routed so far
        self._targets: dict = {}
        self._kv: dict = {}

    def targets(self, gi: int, hw: tuple, device) -> Optional[torch.Tensor]:
        g = self.groups[gi]
        if g.masks is None:
            return None
        key = (gi, tuple(hw))
        hit = self._targets.get(key)
        if hit is None:
            hit = torch.stack([instance_index(m.to(device), hw) for m in g.masks])
            self._targets[key] = hit
        return hit

    def gather(self, x: torch.Tensor, gi: int) -> torch.Tensor:
        g = self.groups[gi]
        return x if g.full else x.index_select(0, g.rows.to(x.device))

    def scatter(self, parts: list) -> torch.Tensor:
        if len(parts) == 1 and self.groups[0].full:
            return parts[0]
        return torch.cat(parts).index_select(0, self.inverse.to(parts[0].device))

    def reference_index(self, prev_key, hw: tuple, device) -> Optional[torch.Tensor]:
        """M^{l-1} as a route index [B, L] on the grid ``hw`` (values 0…N_b, N_b = background): the previous
        layer's maps (argmax; ground-truth one-hot maps in stage 1, router maps in stage 2) resized to
        this layer's grid; None before any layer was routed."""
        maps = self.maps.get(prev_key)
        if maps is None or prev_key not in self.hw:
            return None
        parts = [m.detach().argmax(1) for m in maps]  # [b, L_prev] per group
        index = self.scatter(parts)
        return resize_index(index.to(device), self.hw[prev_key], tuple(hw))

    def routing_loss(self) -> torch.Tensor:
        """Mean over layers of the per-layer routing loss (0 when no layer had masks)."""
        if not self.losses:
            return torch.zeros(())
        return torch.stack([v.float() for v in self.losses.values()]).mean()


def _layer_of(layout: LayerLayout, n: torch.Tensor, extra_options: dict) -> Optional[tuple]:
    """(state, layer key, (h, w)) of the cross-attention layer an attn2_patch call is at, recorded in the
    state; None where no routing state is active or the layer is not in ``layout``."""
    state: Optional[RoutingState] = extra_options.get(STATE_KEY)
    if state is None or "block" not in extra_options:
        return None
    key = block_key(extra_options)
    shape = extra_options.get("activations_shape")
    if layout.get(key) is None or shape is None:
        return None
    hw = (int(shape[-2]), int(shape[-1]))
    if hw[0] * hw[1] != n.shape[1] or n.shape[0] != state.batch:
        raise RuntimeError(f"AnyStory training: layer {key} got {n.shape[0]}×{n.shape[1]} tokens, expected "
                           f"{state.batch}×{hw[0] * hw[1]} (another patch re-tiles tokens?)")
    state.hw[key] = hw
    return state, key, hw


class _LayerMapsPatch:
    """An attn2_patch that stores σ(M^l) of every layer the RoutingState covers (:meth:`maps`); n, context and
    value pass through unchanged."""

    def __init__(self, layout: LayerLayout):
        self.layout = layout

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        at = _layer_of(self.layout, n, extra_options)
        if at is not None:
            self.maps(n, *at)
        return n, context, value

    def maps(self, n, state: "RoutingState", key, hw) -> None:
        raise NotImplementedError


class TrainRouterPatch(_LayerMapsPatch):
    """attn2_patch: the router of layer l on n = norm2(x) → logits → σ(M^l) (Gumbel hard maps in training,
    one-hot argmax in eval) stored in the state for the attn2 replace; routing loss of the layer."""

    def __init__(self, adapter: AnyStoryAdapter, layout: LayerLayout):
        super().__init__(layout)
        self.adapter = adapter

    def maps(self, n, state, key, hw) -> None:
        router = self.adapter.router[str(self.layout.get(key).ckpt_index)]
        maps, loss, preds, gts = [], n.new_zeros((), dtype=torch.float32), [], []
        with_loss = False
        for gi, g in enumerate(state.groups):
            z = state.gather(n, gi)
            logits = router(z, g.R)                                   # [b, K, L] fp32
            if state.mode == "train":
                m = gumbel_maps(logits, tau=state.tau, hard=True)
            else:
                m = one_hot_maps(logits.argmax(1), g.K)
            maps.append(m)
            tgt = state.targets(gi, hw, n.device)
            if tgt is not None:
                loss = loss + layer_routing_loss(logits, tgt, state.reduction) * g.rows.numel()
                with_loss = True
            if state.mode == "eval":
                preds.append(logits.argmax(1))
                gts.append(tgt)
        state.maps[key] = maps
        if with_loss:
            state.losses[key] = loss / state.batch
        if state.mode == "eval":
            pred = state.scatter(preds)
            gt = state.scatter(gts) if all(t is not None for t in gts) else None
            ks = torch.empty(state.batch, dtype=torch.long)
            for g in state.groups:
                ks[g.rows.cpu()] = g.K
            state.pred[key] = (hw, pred, gt, ks)


class TrainGroundTruthPatch(_LayerMapsPatch):
    """attn2_patch of stage 1 (no router yet): σ(M^l) = the one-hot ground-truth routes of layer l (every
    instance on its whole-instance mask, the background elsewhere), stored for the attn2 replace and as
    M^{l-1} of the next layer's reference attention."""

    def maps(self, n, state, key, hw) -> None:
        maps = []
        for gi, g in enumerate(state.groups):
            tgt = state.targets(gi, hw, n.device)
            if tgt is None:
                raise RuntimeError("AnyStory stage-1 training routes by the instance masks: every sample needs them")
            maps.append(one_hot_maps(tgt, g.K))
        state.maps[key] = maps


class TrainRoutedAttn2:
    """attn2 replace: text attention + η·Σ_i σ(M_i) ⊙ Attn(Q, E_i Ŵ_k, E_i Ŵ_v) (eq. 5, the sum form,
    differentiable in the maps). Stage 2: Ŵ and E are frozen, the gradient reaches the router through the
    maps; stage 1 (``trainable``): the gradient reaches E_i (the subject QFormer) and Ŵ."""

    def __init__(self, adapter: AnyStoryAdapter, spec, trainable: bool = False):
        self.adapter = adapter
        self.spec = spec
        self.trainable = trainable

    def __deepcopy__(self, memo):
        return self

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        out = sdpa(q, k, v, heads)
        state: Optional[RoutingState] = extra_options.get(STATE_KEY)
        if state is None or self.spec.key not in state.maps:
            return out
        maps = state.maps[self.spec.key]
        kv = state._kv.get(self.spec.key)
        if kv is None:
            ip = self.adapter.ip_adapter[str(self.spec.ckpt_index)]
            kv = []
            with torch.no_grad() if not self.trainable else contextlib.nullcontext():
                for g in state.groups:
                    E = g.E.to(ip.to_k_ip.weight.dtype)
                    kv.append((ip.to_k_ip(E), ip.to_v_ip(E)))                  # [b, K, m, C]
            if not self.trainable:  # trainable: projected in every call, so that a checkpointed block's
                state._kv[self.spec.key] = kv  # recomputation saves the same tensors as its forward
        parts = []
        for gi, (m, (kr, vr)) in enumerate(zip(maps, kv)):
            qg = state.gather(q, gi)
            parts.append(routed_cross_attention_sum(qg, kr.to(q.dtype), vr.to(q.dtype), m, heads, eta=state.eta))
        return out + state.scatter(parts).to(out.dtype)


class TrainReferenceAttn1:
    """attn1 replace of layer l (not the first: it has no M^{l-1}): eq. 6-8 in the dense paper form for every
    row with reference features, K̃_i = G_i^l W̃_k^l, Ṽ_i = G_i^l W̃_v^l (the adapter's ``reference_proj``, else
    the UNet's own ``attn1`` as the stand-in), routed by M^{l-1} (:meth:`RoutingState.reference_index`), γ = 1.
    Rows without references, and calls without a state, get the plain attention."""

    def __init__(self, adapter: AnyStoryAdapter, spec, prev_key, attn1=None):
        self.adapter = adapter
        self.spec = spec
        self.prev_key = prev_key
        self.attn1 = attn1

    def __deepcopy__(self, memo):
        return self

    def projection(self):
        own = self.adapter.reference_projection(self.spec.ckpt_index)
        return own if own is not None else self.attn1

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        state: Optional[RoutingState] = extra_options.get(STATE_KEY)
        shape = extra_options.get("activations_shape")
        proj = self.projection()
        if state is None or not state.refs or shape is None or proj is None:
            return sdpa(q, k, v, heads)
        index = state.reference_index(self.prev_key, (int(shape[-2]), int(shape[-1])), q.device)
        if index is None or index.shape != q.shape[:2]:
            return sdpa(q, k, v, heads)
        rows = []
        for b in range(q.shape[0]):
            G = state.refs[b].get(self.spec.key) if state.refs[b] is not None else None
            qb, kb, vb = q[b:b + 1], k[b:b + 1], v[b:b + 1]
            if G is None or G.shape[0] == 0:
                rows.append(sdpa(qb, kb, vb, heads))
                continue
            kr, vr = project_references(G.flatten(0, 1).to(q.dtype), proj)
            n, L = G.shape[0], G.shape[1]
            rows.append(routed_reference_attention(qb, kb, vb, list(kr.view(n, L, -1)), list(vr.view(n, L, -1)),
                                                   index[b:b + 1], heads, gamma=1.0))
        return torch.cat(rows)


def transformer_options(patch, replaces: dict, state: RoutingState, attn1: Optional[dict] = None) -> dict:
    """ComfyUI's transformer_options for one UNet call with the training hooks (``patch``: the router's or
    the ground truth's attn2_patch; ``attn1``: the reference attention's replaces, when references are on)."""
    out = {"patches": {"attn2_patch": [patch]}, "patches_replace": {"attn2": dict(replaces)}, STATE_KEY: state}
    if attn1:
        out["patches_replace"]["attn1"] = dict(attn1)
    return out


# ================================================================================================
# gradient checkpointing of a ComfyUI/ldm UNet (no change to ComfyUI: instance-level forward wrappers)
# ================================================================================================
CHECKPOINTED_MODULES = ("SpatialTransformer", "ResBlock")


def _checkpointed(fn, copy_options: bool):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        if copy_options:  # SpatialTransformer(x, context, transformer_options): freeze block/index for recompute
            if len(args) >= 3:
                args = tuple(args[:2]) + (dict(args[2]),) + tuple(args[3:])
            elif "transformer_options" in kwargs:
                kwargs = dict(kwargs, transformer_options=dict(kwargs["transformer_options"]))
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def gradient_checkpointing(unet: nn.Module, enabled: bool = True, modules: Sequence[str] = CHECKPOINTED_MODULES):
    """Recompute the activations of every SpatialTransformer and ResBlock of ``unet`` in the backward pass
    (``torch.utils.checkpoint``, non-reentrant, RNG state preserved so the Gumbel noise is replayed).
    ComfyUI's BasicTransformerBlock ignores its ``checkpoint`` flag and ResBlock's own flag takes the
    frozen parameters as inputs of a re-entrant function, so the wrappers are put on the module
    instances for the duration of the ``with`` block, then removed."""
    if not enabled:
        yield
        return
    done = []
    for m in unet.modules():
        name = type(m).__name__
        if name in modules:
            had = "forward" in m.__dict__
            old = m.__dict__.get("forward")
            m.forward = _checkpointed(m.forward, copy_options=name == "SpatialTransformer")
            done.append((m, had, old))
    try:
        yield
    finally:
        for m, had, old in done:
            if had:
                m.forward = old
            else:
                del m.forward
