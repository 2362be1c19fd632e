"""The caches of one sampling run: what the patch computes once per run and reuses in every step (folded
routers, route/reference K/V on the run's device, mask grids, output buffers), dropped at the run's end
so that a later run sees the UNet weights (LoRAs, other patches) it is sampled with."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..fast.graphs import HookGraphs


@dataclass
class RunCaches:
    graphs: HookGraphs
    route_kv: dict = field(default_factory=dict)      # layer key → (E_i Ŵ_k^l, E_i Ŵ_v^l) on the run's device
    ref_kv: dict = field(default_factory=dict)        # layer key → (K̃_i^l list, Ṽ_i^l list)
    refs_prep: dict = field(default_factory=dict)     # layer key → PreparedReferences or None
    mask_index: dict = field(default_factory=dict)    # token grid → (index, covered, weight) of the region masks
    router_prep: dict = field(default_factory=dict)   # layer key → the folded learned router
    router_out: dict = field(default_factory=dict)    # (layer key, chunk, rows, L, device) → index buffer
    index_out: dict = field(default_factory=dict)     # (layer key, chunk layout, L, device) → [B, L] index
    qe_table: dict = field(default_factory=dict)      # (groups, dtype, device) → query-extra lookup table
    device_copies: dict = field(default_factory=dict)  # name → a tensor moved to the run's device once
    constants: dict = field(default_factory=dict)     # key → a constant tensor made once
    eta_zero: bool = False                            # η = 0 for every route: no routed term at all
    gamma_zero: bool = False                          # γ = 0 for every subject: no reference attention

    def on_device(self, name: str, t, device):
        if t is None:
            return None
        hit = self.device_copies.get(name)
        if hit is None or hit.device != device:
            hit = t.to(device)
            self.device_copies[name] = hit
        return hit

    def constant(self, key, value, dtype, shape, device) -> torch.Tensor:
        """A constant tensor made once per run (background routes of uncond rows, router sources)."""
        hit = self.constants.get(key)
        if hit is None:
            hit = torch.full(shape, value, dtype=dtype, device=device)
            self.constants[key] = hit
        return hit
