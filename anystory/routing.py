"""Routing (§1.2) by source: who decides, token by token, which route a latent token of layer l belongs
to — subject i (1…N) or the background (route N+1) — i.e. the one-hot M^l, kept as a route index
[rows, h·w] (values 0…N, N = background).

One small interface, one implementation per source:

- :class:`LearnedRouting`   — the trained AnyStory router of each layer (R_i from the routing QFormer);
- :class:`AttentionRouting` — training-free: the cross-attention of each subject's words in the prompt,
  carried to the next step (anystory.attention_router);
- :class:`MaskRouting`      — the user's region masks, background elsewhere;
- :class:`MixedRouting`     — region masks where a mask decides, a learned or attention router elsewhere.

:func:`resolve_mode` turns the user's choice (``auto`` included) into one of :data:`MODES` and refuses
choices the inputs cannot serve, once, before anything is patched; :func:`make_routing` builds the
source. Which rows are routed at all (CFG's unconditional rows get the background) is decided by the
patch, not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .fast.router import fold_router
from .fast.router import route as folded_route

MODE_AUTO = "auto"
MODE_ROUTER = "router"        # the learned AnyStory router
MODE_MASKS = "masks"          # user masks only; background elsewhere
MODE_MIXED = "mixed"          # user masks where given, router (learned or attention) elsewhere
MODE_ATTENTION = "attention"  # training-free attention router (subject words of the prompt)
MODES = (MODE_ROUTER, MODE_MASKS, MODE_MIXED, MODE_ATTENTION)

# who decided a token's route (for the preview): stored in the recorder beside the route index
SOURCE_ROUTER, SOURCE_MASK, SOURCE_ATTENTION = 0, 1, 2


class RoutingChoiceError(ValueError):
    """The chosen router mode cannot work with these inputs; the message says what to change."""


@dataclass(frozen=True)
class RoutingPlan:
    """What :func:`resolve_mode` decided: the mode, and which sources it runs."""

    mode: str
    learned: bool    # the learned router decides (alone, or beside masks)
    attention: bool  # the attention router decides (alone, or beside masks)
    masks: bool      # region masks decide where they cover


def resolve_mode(requested: str, *, learned: bool, unlabelled: list, has_masks: bool,
                 model_name: str = "the AnyStory model") -> RoutingPlan:
    """The router mode for ``requested`` (one of :data:`MODES` or ``auto``).

    learned: a learned router is available (the file has one and every subject has R_i);
    unlabelled: 1-based indices of subjects without label words (the attention router needs them);
    has_masks: one region mask per subject was given.
    ``auto``: the learned router if available, else the attention router (labels), with region masks on
    top where given; masks alone when neither can run."""
    labelled = not unlabelled
    mode = requested
    if mode == MODE_AUTO:
        if learned or labelled:
            mode = MODE_MIXED if has_masks else (MODE_ROUTER if learned else MODE_ATTENTION)
        elif has_masks:
            mode = MODE_MASKS
        else:
            raise RoutingChoiceError(
                f"nothing can decide where the subjects go: {model_name} has no learned router (public "
                "IP-Adapter weights) and not every subject has a label. Give each AnyStorySubjectEncode a "
                "label (its words in the prompt) and encode the prompt with AnyStory Text Encode, or connect "
                "region_masks (one per subject).")
    if mode not in MODES:
        raise RoutingChoiceError(f"unknown router mode {requested!r}; choose one of auto, {', '.join(MODES)}")
    if mode == MODE_ROUTER and not learned:
        raise RoutingChoiceError(f"router_mode 'router' needs the learned AnyStory router, which {model_name} does "
                                 "not have (public IP-Adapter weights). Use 'attention' (subject labels) or 'masks'.")
    attention = mode == MODE_ATTENTION or (mode == MODE_MIXED and not learned)
    if attention and unlabelled:
        raise RoutingChoiceError(f"router_mode '{mode}' uses the attention router, which finds each subject by its "
                                 f"label words in the prompt; subject(s) {unlabelled} have no label. Set 'label' "
                                 "on their AnyStorySubjectEncode.")
    if mode in (MODE_MASKS, MODE_MIXED) and not has_masks:
        raise RoutingChoiceError(f"router_mode '{mode}' needs region_masks: one mask per subject, in subject order")
    return RoutingPlan(mode, learned=mode in (MODE_ROUTER, MODE_MIXED) and learned, attention=attention,
                       masks=mode in (MODE_MASKS, MODE_MIXED))


class Routing:
    """A source of M^l for the cond rows of one layer call.

    ``per_grid``: it decides the same for every layer of one token grid within a UNet call (so the patch
    computes it once per grid and call). ``learned``: it runs the learned router (whose weights must stay
    loaded while sampling). :meth:`route_rows` returns (route index [rows, L] long or None when it cannot
    decide yet, source [rows, L] uint8 or None, per-token injection weight [rows, L] or None)."""

    per_grid = True
    learned = False
    feathered = False   # covered tokens carry an injection weight (feathered region masks)
    needs_labels = False  # it cannot route at all without the subjects' word positions in the prompt
    num_routes = 0

    def begin_run(self, steps: Optional[int] = None) -> None:
        """A new sampling run of ``steps`` steps (None: unknown) starts: drop what the last one left."""

    def run_warning(self, steps: Optional[int]) -> Optional[str]:
        """Why a run of ``steps`` steps cannot be routed by this source (None when it can)."""
        return None

    def observe(self, state, key, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        """attn2 of layer l saw the text attention's q, k (the attention router collects there)."""

    def route_rows(self, run, spec, z: torch.Tensor, hw: tuple, state, chunk: int = 0,
                   out: Optional[torch.Tensor] = None):
        raise NotImplementedError

    def background(self, run, rows: int, L: int, device, source: int):
        """(every token to the background, ``source``): what the patch routes when nothing decides."""
        return (torch.full((rows, L), self.num_routes - 1, dtype=torch.long, device=device),
                torch.full((rows, L), source, dtype=torch.uint8, device=device))


class LearnedRouting(Routing):
    """The trained router of each layer, folded once per run (anystory.fast.router) and replayed from
    CUDA graphs where the patch's graphs are usable."""

    per_grid = False
    learned = True

    def __init__(self, adapter, R: torch.Tensor):
        """adapter: holds ``router[str(ckpt index)]``; R: [K, 1, 2048] routing features (K = N+1)."""
        self.adapter = adapter
        self.R = R
        self.num_routes = R.shape[0]

    def route_rows(self, run, spec, z, hw, state, chunk=0, out=None):
        rows, L, dev = z.shape[0], z.shape[1], z.device
        router = self.adapter.router[str(spec.ckpt_index)]
        prep = run.router_prep.get(spec.key)
        if prep is None or prep["w"].device != dev:
            r = run.on_device("R", self.R, dev).transpose(0, 1)  # [1, K, 2048]
            prep = fold_router(router, r)  # folded in fp32, stored in the weights' dtype
            run.router_prep[spec.key] = prep
        if run.graphs.usable(z):
            # one slot and one output buffer per layer and chunk (made outside any capture): a graph's
            # own allocations live in the pool the other graphs reuse
            buf = out
            if buf is None:
                ok = (spec.key, chunk, rows, L, dev)
                buf = run.router_out.get(ok)
                if buf is None:
                    buf = run.router_out[ok] = torch.empty(rows, L, dtype=torch.long, device=dev)
            # the graph reads only z and the prepared tensors (copies folded from the router's weights
            # for this run, kept alive as its statics)
            index = run.graphs.run((spec.key, "router", chunk), (z,), tuple(prep.values()) + (buf,),
                                   lambda z: folded_route(router, z.to(router.proj_z.weight.dtype), prep, out=buf))
        else:
            index = folded_route(router, z.to(router.proj_z.weight.dtype), prep)
        src = run.constant(("src", SOURCE_ROUTER, rows, L, dev), SOURCE_ROUTER, torch.uint8, (rows, L), dev)
        return index, src, None


class AttentionRouting(Routing):
    """The training-free attention router (anystory.attention_router): decides from the previous step's
    label attention, nothing during its warm-up."""

    needs_labels = True

    def __init__(self, router, num_routes: int):
        self.router = router
        self.num_routes = num_routes

    def begin_run(self, steps: Optional[int] = None) -> None:
        self.router.begin_run(steps)

    def run_warning(self, steps: Optional[int]) -> Optional[str]:
        return self.router.run_warning(steps)

    def observe(self, state, key, q, k, heads) -> None:
        self.router.observe(state, key, q, k, heads)

    def route_rows(self, run, spec, z, hw, state, chunk=0, out=None):
        index = self.router.route(spec, hw, z.shape[0], z.device, state)
        if index is None:
            return None, None, None
        return index, torch.full_like(index, SOURCE_ATTENTION, dtype=torch.uint8), None


class MaskRouting(Routing):
    """Region masks [N, H, W] in image space (white = subject i); an all-zero mask decides nothing. A
    token is covered where the best mask's area-average exceeds 0.5; with ``feather`` the injection of a
    covered token is scaled by clamp(2·m − 1, 0, 1), fading to nothing at the mask's edge."""

    def __init__(self, masks: torch.Tensor, num_routes: int, feather: bool = False):
        self.masks = masks
        self.num_routes = num_routes
        self.feather = feather
        self.feathered = feather

    def mask_index(self, run, hw: tuple, device):
        """(index [L] with -1 where no mask decides, covered [L] bool, weight [L]), once per grid and run."""
        hit = run.mask_index.get(hw)
        if hit is None:
            m = F.interpolate(self.masks[:, None].float(), size=hw, mode="area")[:, 0]
            m = m.flatten(1)  # [N, L]
            best, arg = m.max(0)
            covered = best > 0.5
            idx = torch.where(covered, arg, torch.full_like(arg, -1))
            w = torch.ones_like(best)
            if self.feather:
                w = torch.where(covered, (2 * best - 1).clamp(0, 1), w)
            hit = (idx.to(device), covered.to(device), w.to(device))
            run.mask_index[hw] = hit
        return hit

    def overlay(self, run, hw, index, src, rows: int, device):
        """Masks over a base decision (None: background); returns (index, source, weight)."""
        midx, covered, mw = self.mask_index(run, tuple(hw), device)
        if index is None:
            index, src = self.background(run, rows, covered.shape[0], device, SOURCE_MASK)
        index = torch.where(covered, midx, index)
        src = torch.where(covered, SOURCE_MASK, src)  # a host scalar: no host→device copy (sync)
        return index, src, mw.expand(rows, -1)

    def route_rows(self, run, spec, z, hw, state, chunk=0, out=None):
        return self.overlay(run, hw, None, None, z.shape[0], z.device)


class MixedRouting(Routing):
    """Region masks where they cover, ``base`` (learned or attention router) elsewhere."""

    def __init__(self, base: Routing, masks: MaskRouting):
        self.base = base
        self.masks = masks
        self.num_routes = masks.num_routes
        self.per_grid = base.per_grid
        self.learned = base.learned
        self.feathered = masks.feathered

    def begin_run(self, steps: Optional[int] = None) -> None:
        self.base.begin_run(steps)

    def run_warning(self, steps: Optional[int]) -> Optional[str]:
        w = self.base.run_warning(steps)
        return None if w is None else w + " (region masks still decide where they cover)"

    def observe(self, state, key, q, k, heads) -> None:
        self.base.observe(state, key, q, k, heads)

    def route_rows(self, run, spec, z, hw, state, chunk=0, out=None):
        index, src, _ = self.base.route_rows(run, spec, z, hw, state, chunk, out)
        return self.masks.overlay(run, hw, index, src, z.shape[0], z.device)


def make_routing(plan: RoutingPlan, num_routes: int, *, adapter=None, R: Optional[torch.Tensor] = None,
                 attention_router=None, masks: Optional[torch.Tensor] = None, feather: bool = False) -> Routing:
    """The routing source of a :class:`RoutingPlan`."""
    base = None
    if plan.learned:
        if adapter is None or not adapter.has_router or R is None:
            raise RoutingChoiceError("the learned router needs a native AnyStory file with a router and the "
                                     "subjects' routing features")
        base = LearnedRouting(adapter, R)
    elif plan.attention:
        if attention_router is None:
            raise RoutingChoiceError(f"router mode {plan.mode!r} needs subject words (labels)")
        base = AttentionRouting(attention_router, num_routes)
    if not plan.masks:
        return base
    if masks is None:
        raise RoutingChoiceError(f"router mode {plan.mode!r} needs one region mask per subject")
    mask_routing = MaskRouting(masks, num_routes, feather)
    return mask_routing if base is None else MixedRouting(base, mask_routing)
