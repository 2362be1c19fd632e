"""The values that travel on AnyStory's sockets: ANYSTORY, ANYSTORY_SUBJECTS, ANYSTORY_ROUTING,
ANYSTORY_FLUX_OPTIONS (nodes/flux/options.py).

Socket type names are public API (workflows store them); never rename them.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..anystory.adapter import AnyStoryAdapter
from ..anystory.checkpoint import RefNetWeights
from ..anystory.paper.reference import ReferenceFeatures
from ..anystory.preview import MAX_SUBJECTS

ANYSTORY = "ANYSTORY"
ANYSTORY_SUBJECTS = "ANYSTORY_SUBJECTS"
ANYSTORY_ROUTING = "ANYSTORY_ROUTING"
ANYSTORY_FLUX_OPTIONS = "ANYSTORY_FLUX_OPTIONS"


class AnyStoryError(ValueError):
    """A problem with what the user wired or chose; the message says what, where and how to fix it.
    Raised as a normal exception so ComfyUI shows it on the node and keeps serving."""


@dataclass(eq=False)
class AnyStoryModel:
    """ANYSTORY: what AnyStoryModelLoader loaded ("router loading").

    adapter: SDXL: subject QFormer + per-layer Ŵ_k/Ŵ_v (+ routing QFormer and router when native);
        FLUX: ``anystory.flux.adapter.FluxAdapter`` (the LoRAs and encoder additions of anystory_flux).
    patcher: a ComfyUI ModelPatcher around ``adapter`` so model_management loads/offloads it.
    refnet: native ReferenceNet weights, or None (then the shared-UNet stand-in is used; SDXL only).
    """

    name: str
    adapter: "AnyStoryAdapter | object"
    patcher: object
    refnet: Optional[RefNetWeights] = None
    refnet_name: Optional[str] = None
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    _refnet_module: object = None  # built lazily by nodes/refnet.py

    def __deepcopy__(self, memo):
        return self

    @property
    def family(self) -> str:
        return getattr(self.adapter, "family", "SDXL")

    def describe(self) -> str:
        slots = dict(self.adapter.slots)
        if self.family == "SDXL":
            slots["ReferenceNet"] = ("native AnyStory" if self.refnet is not None
                                     else "training-free (shared UNet, connect MODEL on the encode node)")
        return f"{self.name} — " + "; ".join(f"{k}: {v}" for k, v in slots.items())


@dataclass(eq=False)
class Subject:
    """One encoded subject i: E_i, R_i, G_i^l (cached once) and what the UI shows of it. FLUX: E = the 81 Redux
    subject tokens [81, 4096], R = the 9 routing tokens [9, 4096], refs = anystory.flux.subject.FluxReference."""

    E: torch.Tensor                     # [m, 2048]
    R: Optional[torch.Tensor]           # [1, 2048] or None
    refs: Optional[ReferenceFeatures]   # G_i^l of this subject (1 subject), or None
    label: str = ""
    strength: float = 1.0
    preview: Optional[torch.Tensor] = None  # [S, S, 3] the segmented crop the encoders saw
    warnings: list = field(default_factory=list)
    zero_image: str = ""                # SDXL: the zero image of the E_{N+1}, R_{N+1} made with it (ZERO_IMAGES)


@dataclass(eq=False)
class SubjectList:
    """ANYSTORY_SUBJECTS: subjects in order (order = index = colour), plus the background route
    (E_{N+1}, R_{N+1} from the zero image, made with the first subject; None for FLUX, whose router has no background route), all made with
    one ANYSTORY model of ``family``."""

    model_uid: str
    model_name: str
    subjects: list
    E_bg: Optional[torch.Tensor]
    R_bg: Optional[torch.Tensor]
    family: str = "SDXL"

    def __deepcopy__(self, memo):
        return self

    def __len__(self):
        return len(self.subjects)

    def extended(self, subject: Subject) -> "SubjectList":
        if len(self.subjects) >= MAX_SUBJECTS:
            raise AnyStoryError(
                f"AnyStory takes at most {MAX_SUBJECTS} subjects in one image; this chain already has "
                f"{len(self.subjects)}. Split the scene or drop a subject.")
        return SubjectList(self.model_uid, self.model_name, self.subjects + [subject], self.E_bg, self.R_bg,
                           self.family)

    @property
    def labels(self) -> list:
        return [s.label or f"subject {i + 1}" for i, s in enumerate(self.subjects)]
