"""Training-free router (a stand-in for the learned router of §1.2), after Prompt-to-Prompt.

Each subject i is named by words of the positive prompt (its label, e.g. "the red car"). During step t
the text cross-attention probabilities of those words' tokens, softmax over all prompt tokens,
averaged over heads and summed over the label's tokens, are collected at every cross-attention layer
and aggregated over the layers of the coarsest token grid (the most semantic ones, and the cheapest):

    a_i(u) = Σ_l Σ_{τ ∈ label_i} mean_h softmax_τ'(q_u k_τ'/√d)[τ]      (then a_i /= max_u a_i)

At step t+1 every token u is routed to argmax_i a_i(u) when max_i a_i(u) ≥ threshold, else to the
background — the maps are carried from one step to the next, and routing starts after a warm-up of
``warmup`` × the run's steps (a share of the schedule, so 1-4 step models route too; ``warmup_steps``
fixes a number of steps instead). Before that every token is background, and step 0 never routes (it has
no previous step). Optional smoothing (a k×k mean) keeps regions compact.

Label words are found in the prompt's token ids (ComfyUI's tokenizer, so weighting syntax and prompts
longer than 77 tokens work): see :func:`find_label_positions`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .paper.attention import split_heads

DEFAULT_WARMUP = 0.1  # share of the steps before routing starts: 2 of 20 steps, as the fixed 2 steps it replaced
ASSUMED_STEPS = 20  # a run whose length the sampler does not give

STOP_WORDS = {"a", "an", "the", "of", "and", "with", "in", "on", "at", "to", "his", "her", "its", "their", "my"}


def find_label_positions(chunks: list, label_ids: list, chunk_len: int = 77,
                         stop_ids: Optional[set] = None) -> list:
    """Positions (in the concatenated context, chunk c → c·chunk_len + i) of every occurrence of the
    token sequence ``label_ids`` in ``chunks`` (lists of token ids per 77-token chunk; a word cut by a
    chunk border is found too). Tokens in ``stop_ids`` ("the", "a"…) are dropped from the result unless
    the label has nothing else."""
    flat, where = [], []
    for c, chunk in enumerate(chunks):
        for i, t in enumerate(chunk):
            flat.append(t)
            where.append(c * chunk_len + i)
    n = len(label_ids)
    if n == 0:
        return []
    hits = []
    for s in range(len(flat) - n + 1):
        if flat[s:s + n] == list(label_ids):
            hits.extend(range(s, s + n))
    if not hits:
        return []
    keep = [h for h in hits if not stop_ids or flat[h] not in stop_ids]
    return sorted({where[h] for h in (keep or hits)})


def _assignment(positions: list, T: int, device) -> tuple:
    """(label token columns [P], assignment [P, N]: which subject each column counts for)."""
    cols, owner = [], []
    for i, pos in enumerate(positions):
        for p in pos:
            if p < T:
                cols.append(p)
                owner.append(i)
    A = torch.zeros(len(cols), len(positions))
    A[torch.arange(len(cols)), torch.tensor(owner, dtype=torch.long)] = 1.0
    return torch.tensor(cols, dtype=torch.long, device=device), A.to(device)


def label_attention(q: torch.Tensor, k: torch.Tensor, heads: int, positions: list, assign=None) -> torch.Tensor:
    """[B, N, L]: for each subject, Σ_{τ ∈ label} mean_h softmax over all text tokens of q·k/√d
    (only the label columns are exponentiated: p_τ = exp(logit_τ − logsumexp))."""
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    logits = torch.matmul(qh, kh.transpose(-1, -2)).float() * qh.shape[-1] ** -0.5  # [B, H, L, T]
    cols, A = assign if assign is not None else _assignment(positions, logits.shape[-1], q.device)
    if cols.numel() == 0:
        return torch.zeros(q.shape[0], len(positions), q.shape[1], device=q.device)
    lse = torch.logsumexp(logits, -1, keepdim=True)
    p = (logits.index_select(-1, cols) - lse).exp().mean(1)  # [B, L, P]
    return torch.matmul(p, A).transpose(1, 2)  # [B, N, L]


class AttentionRouter:
    """Collects label attention during a step and routes with it in the next.

    State lives here for one sampling run (``begin_run`` clears it); rows are the cond rows of each UNet
    call in order, so the maps of image b at step t+1 come from image b at step t."""

    def __init__(self, num_subjects: int, warmup_steps: Optional[int] = None, threshold: float = 0.35,
                 smooth: int = 3, layers: Optional[set] = None, warmup: float = DEFAULT_WARMUP):
        """warmup: the share of a run's steps before routing starts (0…1); warmup_steps: a fixed number of
        steps instead (None: use ``warmup``). layers: the layer keys whose attention is collected (None: every
        layer of the coarsest grid)."""
        self.num_subjects = num_subjects
        self.layers = layers
        self.warmup = float(warmup)
        self.warmup_steps = None if warmup_steps is None else int(warmup_steps)
        self.threshold = float(threshold)
        self.smooth = int(smooth)
        self.begin_run()

    def __deepcopy__(self, memo):
        return self

    def warmup_for(self, steps: Optional[int]) -> int:
        """Steps of warm-up in a run of ``steps`` steps: ``warmup_steps`` when fixed, else ⌊warmup · steps⌉."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(math.floor(self.warmup * (steps or ASSUMED_STEPS) + 0.5))

    def first_routed_step(self, steps: Optional[int]) -> int:
        """The first step that can route: after the warm-up, and never step 0 (maps come from the step before)."""
        return max(1, self.warmup_for(steps))

    def run_warning(self, steps: Optional[int]) -> Optional[str]:
        """What to tell the user when a run of ``steps`` steps cannot route at all (None when it can)."""
        if steps is None or self.first_routed_step(steps) < steps:
            return None
        if steps <= 1:
            return ("the attention router decides from the previous step's attention, so a 1-step sampling is "
                    "never routed: use 2 or more steps, or region masks (router_mode masks)")
        return (f"region routing would start at step {self.first_routed_step(steps) + 1} of a {steps}-step "
                "sampling, so it never starts: lower region_warmup (e.g. 0.1)")

    def begin_run(self, steps: Optional[int] = None) -> None:
        self.steps = steps
        self._assign_key = None
        self._acc: dict = {}     # hw → [Bc, N, L] summed label attention of the step being collected
        self._acc_step = None
        self._maps = None        # ([Bc, N, h, w] normalised maps, step they came from)
        self._min_area = None    # the coarsest grid seen: only its layers are aggregated (cheapest, most semantic)

    # --- collecting ----------------------------------------------------------------------------
    def observe(self, state, key, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        """attn2 of a layer: add the label attention of the cond rows that carry label positions."""
        labels = getattr(state, "labels", None)
        if not labels or (self.layers is not None and key not in self.layers):
            return
        hw = getattr(state, "layer_hw", {}).get(key)
        if hw is None:
            return
        area = hw[0] * hw[1]
        if self._min_area is not None and area > self._min_area:
            return
        self._min_area = area
        self._roll(state.step)
        rows, pos = [], None
        for (sl, is_cond), lab in zip(state.chunks, labels):
            if is_cond and lab is not None:
                rows.append(sl)
                pos = lab
        if not rows or pos is None:
            return
        qs = torch.cat([q[sl] for sl in rows]) if len(rows) > 1 else q[rows[0]]
        ks = torch.cat([k[sl] for sl in rows]) if len(rows) > 1 else k[rows[0]]
        # by content: state.labels is a new list every UNet call, and a new assignment costs two
        # host→device copies (each a device sync)
        akey = (tuple(tuple(p) for p in pos), ks.shape[1], str(ks.device))
        if getattr(self, "_assign_key", None) != akey:
            self._assign = _assignment(pos, ks.shape[1], ks.device)
            self._assign_key = akey
        a = label_attention(qs, ks, heads, pos, self._assign)  # [Bc, N, L]
        prev = self._acc.get(hw)
        self._acc[hw] = a if prev is None or prev.shape != a.shape else prev + a

    def _roll(self, step: int) -> None:
        if self._acc_step is None:
            self._acc_step = step
        elif step != self._acc_step:
            self._finalize()
            self._acc_step = step

    def _finalize(self) -> None:
        if not self._acc:
            return
        target = min(self._acc, key=lambda hw: hw[0] * hw[1])
        a = self._acc[target]
        total = a.view(a.shape[0], a.shape[1], *target)
        if self.smooth > 1:
            total = F.avg_pool2d(total, self.smooth, stride=1, padding=self.smooth // 2, count_include_pad=False)
        mx = total.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
        self._maps = (total / mx, self._acc_step)
        self._acc = {}

    # --- routing -------------------------------------------------------------------------------
    def maps(self) -> Optional[torch.Tensor]:
        return None if self._maps is None else self._maps[0]

    def route(self, spec, hw: tuple, rows: int, device, state) -> Optional[torch.Tensor]:
        """Route index [rows, h·w] for a layer of grid hw from the previous step's maps, or None during
        the warm-up / before any maps exist (the caller then routes to the background)."""
        if state.step < self.warmup_for(getattr(state, "steps", None) or self.steps):
            return None
        if self._acc_step is not None and self._acc_step < state.step:
            self._finalize()
            self._acc_step = state.step
        if self._maps is None:
            return None
        maps = self._maps[0]
        if maps.shape[0] != rows:
            maps = maps[:1].expand(rows, -1, -1, -1) if maps.shape[0] == 1 or maps.shape[0] > rows else None
            if maps is None:
                return None
        m = F.interpolate(maps.float(), size=tuple(hw), mode="bilinear", align_corners=False).flatten(2)  # [B,N,L]
        best, arg = m.max(1)
        idx = torch.where(best >= self.threshold, arg, torch.full_like(arg, self.num_subjects))
        return idx.to(device)


def observed_layers(layout, max_layers: int = 16) -> set:
    """The layers the attention router listens to: the widest (coarsest-grid, most semantic) blocks,
    at most ``max_layers`` of them spread evenly over execution order."""
    widest = max(s.dim for s in layout)
    keys = [s.key for s in layout if s.dim == widest]
    if len(keys) > max_layers:
        keys = [keys[round(i * (len(keys) - 1) / (max_layers - 1))] for i in range(max_layers)]
    return set(keys)
