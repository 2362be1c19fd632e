"""The model-family seam of the nodes: which family (SDXL, FLUX.1) an ANYSTORY value, a model file and a
ComfyUI MODEL belong to. Each family provides ``claims_file(path)``, ``load_file(...)``, ``owns(anystory)``,
``owns_model(model)``, ``check_model(model, anystory)``, ``encode(...)`` and ``apply(...)``; the node classes
call these and never branch on the family themselves."""
from __future__ import annotations

from .flux.family import FLUX
from .sdxl import SDXL
from .types import AnyStoryError, AnyStoryModel

FAMILIES = [SDXL, FLUX]  # the first is the default: it reads (and explains) every file no other family claims


def register(family) -> None:
    """Add a model family (e.g. FLUX.1) after the built-in ones."""
    if all(f.name != family.name for f in FAMILIES):
        FAMILIES.append(family)


def family_of(anystory: AnyStoryModel):
    for fam in FAMILIES:
        if fam.owns(anystory):
            return fam
    raise AnyStoryError(f"{anystory.name} is not an AnyStory model this version of the pack can run")


def family_for(anystory: AnyStoryModel, model=None):
    """The family of ``anystory``; with ``model``, also checks that the MODEL is of the same family (a
    clear error naming both when it is not)."""
    fam = family_of(anystory)
    if model is not None and not fam.owns_model(model):
        other = next((f for f in FAMILIES if f.owns_model(model)), None)
        if other is not None:  # a model of a family the pack knows: name both
            raise AnyStoryError(f"{anystory.name} is an AnyStory {fam.name} model, but the connected MODEL is "
                                f"{other.name}: connect a MODEL of the {fam.name} family, or pick the AnyStory "
                                f"{other.name} file in AnyStoryModelLoader.")
    return fam  # the family's own check_model says what else is wrong with the MODEL


def family_of_file(path: str):
    """The family whose loader reads ``path``: the first of the others that claims it, else the default."""
    for fam in FAMILIES[1:]:
        if fam.claims_file(path):
            return fam
    return FAMILIES[0]
