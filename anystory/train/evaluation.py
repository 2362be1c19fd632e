"""Evaluation of a router: routing IoU per layer group on held-out images.

For each held-out image and timestep the UNet runs with the router in inference mode (one-hot argmax
maps); at every layer l the region the router gives each instance i (argmax of M^l = i) is compared with
the instance's mask on that layer's grid. :class:`RoutingEval` keeps the IoUs per layer and per group
("down 1/2", "mid 1/4", …: UNet side and grid scale); :func:`format_iou_table` prints runs side by side.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .data import TrainSample
from .trainer import Encoders, RouterTrainer, prepare_batch, step_seed


def iou_per_subject(pred: torch.Tensor, gt: torch.Tensor, num_subjects: int) -> list:
    """IoU of route i between predicted and ground-truth route indices [L], for the subjects present in
    the ground truth (a subject absent at this grid is skipped)."""
    out = []
    for i in range(num_subjects):
        g = gt == i
        if not bool(g.any()):
            continue
        p = pred == i
        out.append(float((p & g).sum()) / float((p | g).sum()))
    return out


_SIDE = {"input": "down", "middle": "mid", "output": "up"}


def layer_group(key: tuple, hw: tuple, latent_hw: tuple) -> str:
    """"down 1/2", "mid 1/4", "up 1/4", … (UNet side and the layer grid's scale to the latent)."""
    ratio = max(1, round(latent_hw[0] / max(1, hw[0])))
    return f"{_SIDE.get(key[0], key[0])} 1/{ratio}"


@dataclass
class RoutingEval:
    """Per-instance routing IoUs of the predicted (argmax) maps against the ground-truth instance masks,
    per layer; groups: layer group → mean IoU (and the number of layers); mean: over every entry."""

    per_layer: dict = field(default_factory=dict)   # key → list of IoUs
    groups: dict = field(default_factory=dict)      # group → (mean IoU, layers, entries)
    group_order: list = field(default_factory=list)
    loss: dict = field(default_factory=dict)        # mean diffusion / routing / total loss (eval maps)

    @property
    def mean(self) -> float:
        vals = [v for vs in self.per_layer.values() for v in vs]
        return sum(vals) / len(vals) if vals else float("nan")

    def as_dict(self) -> dict:
        return {"mean_iou": self.mean, "groups": {g: {"iou": m, "layers": n, "entries": e}
                                                  for g, (m, n, e) in self.groups.items()},
                "loss": dict(self.loss)}


@torch.no_grad()
def evaluate_routing(trainer: RouterTrainer, samples: Sequence[TrainSample], encoders: Encoders,
                     timesteps: Sequence[int] = (200, 400, 600), seed: int = 0, batch_size: int = 1,
                     cache: Optional[dict] = None, device=None) -> RoutingEval:
    """Routing IoU of ``trainer``'s router on held-out samples: for each sample and each timestep, the
    target latent is noised (fixed noise from ``seed``), the UNet runs with the router in inference mode
    (one-hot argmax maps), and at every layer each instance's predicted region is compared with its
    mask on that layer's grid. Reference views are un-augmented crops (or the given references), as the
    encode node would prepare them. Also returns the mean losses of these passes."""
    device = device or trainer.alphas_cumprod.device
    per_layer: dict = {}
    group_of: dict = {}
    order: list = []
    sums = {"diffusion": 0.0, "routing": 0.0, "loss": 0.0}
    count = 0
    for b0 in range(0, len(samples), batch_size):
        chunk = list(samples[b0:b0 + batch_size])
        ref_size = trainer.config.ref_size if getattr(trainer, "references", None) is not None else None
        batch = prepare_batch(chunk, encoders, None, augment=False, cache=cache, ref_size=ref_size).to(device)
        latent_hw = tuple(batch.x0.shape[-2:])
        for ti, t in enumerate(timesteps):
            g = torch.Generator().manual_seed(step_seed(seed, b0, ti))
            noise = torch.randn(batch.x0.shape, generator=g).to(device)
            tt = torch.full((len(chunk),), int(t), dtype=torch.long, device=device)
            out = trainer(batch, t=tt, noise=noise, mode="eval")
            for k in sums:
                sums[k] += float(out[k])
            count += 1
            for key, (hw, pred, gt, ks) in out["state"].pred.items():
                if gt is None:
                    continue
                if key not in group_of:
                    group_of[key] = layer_group(key, hw, latent_hw)
                    if group_of[key] not in order:
                        order.append(group_of[key])
                lst = per_layer.setdefault(key, [])
                for r in range(pred.shape[0]):
                    lst.extend(iou_per_subject(pred[r].cpu(), gt[r].cpu(), int(ks[r]) - 1))
    groups = {}
    for gname in order:
        keys = [k for k in per_layer if group_of[k] == gname]
        vals = [v for k in keys for v in per_layer[k]]
        groups[gname] = (sum(vals) / len(vals) if vals else float("nan"), len(keys), len(vals))
    return RoutingEval(per_layer, groups, order, {k: v / max(1, count) for k, v in sums.items()})


def format_iou_table(results: dict,
                     title: str = "routing IoU (per instance, mean over held-out images × timesteps)") -> str:
    """A text table: rows = layer groups (+ "all"), one column per named :class:`RoutingEval`."""
    names = list(results)
    order: list = []
    for ev in results.values():
        for g in ev.group_order:
            if g not in order:
                order.append(g)
    first = next(iter(results.values()))
    w0 = max([len("group"), len("all")] + [len(g) for g in order]) + 2
    cols = [max(9, len(n) + 2) for n in names]
    head = "group".ljust(w0) + "layers".rjust(7) + "".join(n.rjust(c) for n, c in zip(names, cols))
    lines = [title, head, "-" * len(head)]
    for g in order:
        n_layers = first.groups.get(g, (0, 0, 0))[1]
        row = g.ljust(w0) + str(n_layers).rjust(7)
        for n, c in zip(names, cols):
            v = results[n].groups.get(g, (float("nan"),))[0]
            row += f"{v:.3f}".rjust(c)
        lines.append(row)
    lines.append("-" * len(head))
    row = "all".ljust(w0) + str(sum(first.groups.get(g, (0, 0, 0))[1] for g in order)).rjust(7)
    for n, c in zip(names, cols):
        row += f"{results[n].mean:.3f}".rjust(c)
    lines.append(row)
    return "\n".join(lines)
