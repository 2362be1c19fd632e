"""AnyStoryFluxOptions: the settings of the authors' ``AnyStoryFluxPipeline.generate`` that change the image, for
AnyStoryApply's optional ``flux_options`` input (absent = these defaults). SDXL models ignore them."""
from __future__ import annotations

from dataclasses import dataclass

from ..types import ANYSTORY_FLUX_OPTIONS, AnyStoryError

ROUTER_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class FluxOptions:
    """ANYSTORY_FLUX_OPTIONS. Defaults = the authors' ``generate()`` (router: 'auto', see the node)."""

    redux_scale: float = 0.6
    redux_start: float = 0.1
    redux_end: float = 0.3
    ref_start: float = 0.0
    ref_end: float = 1.0
    ref_shift: float = 0.0
    ref_mask: bool = True
    router: str = "auto"
    ref_cache: bool = True

    def __deepcopy__(self, memo):
        return self


def _window(name: str, start: float, end: float) -> None:
    if start > end:
        raise AnyStoryError(f"AnyStory FLUX options: {name}_start ({start}) is after {name}_end ({end}); the "
                            f"{name} would never act. Make {name}_start ≤ {name}_end.")


class AnyStoryFluxOptions:
    CATEGORY = "AnyStory"
    FUNCTION = "options"
    RETURN_TYPES = (ANYSTORY_FLUX_OPTIONS,)
    RETURN_NAMES = ("flux_options",)
    OUTPUT_TOOLTIPS = ("Connect to AnyStory Apply's flux_options (FLUX models only).",)
    DESCRIPTION = ("The AnyStory FLUX settings of the authors' pipeline (generate()): when the subjects' Redux "
                   "tokens and reference features act, how strongly, and whether the router splits the image "
                   "between subjects. Without this node AnyStory Apply uses these defaults. Steps: a window "
                   "[start, end) covers steps i with round(N·start) ≤ i < round(N·end) of the N sampling steps.")

    @classmethod
    def INPUT_TYPES(cls):
        d = FluxOptions()
        return {"required": {
            "redux_scale": ("FLOAT", {"default": d.redux_scale, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                            "Strength of the subjects' Redux tokens (81 per subject, appended to the prompt; "
                            "AnyStory Apply's subject_strength and each subject's strength multiply it). 0 = no Redux tokens."}),
            "redux_start": ("FLOAT", {"default": d.redux_start, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                            "Fraction of the steps after which the Redux tokens start acting (the authors: 0.1)."}),
            "redux_end": ("FLOAT", {"default": d.redux_end, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                          "Fraction of the steps at which the Redux tokens stop (the authors: 0.3; they only "
                          "steer the early layout)."}),
            "ref_start": ("FLOAT", {"default": d.ref_start, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                          "Fraction of the steps after which the reference features act (keep details). The "
                          "authors' demo uses 0.09 with 2+ subjects, 0 with one."}),
            "ref_end": ("FLOAT", {"default": d.ref_end, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                        "Fraction of the steps at which the reference features stop acting."}),
            "ref_shift": ("FLOAT", {"default": d.ref_shift, "min": -10.0, "max": 10.0, "step": 0.05, "tooltip":
                          "Logit offset on every reference key: > 0 the image copies the reference more, < 0 "
                          "less (AnyStory Apply's detail_strength adds its logarithm)."}),
            "ref_mask": ("BOOLEAN", {"default": d.ref_mask, "tooltip":
                         "Hide the reference's background tokens (outside the subject mask) from the image; the "
                         "authors keep this on."}),
            "router": (list(ROUTER_CHOICES), {"default": d.router, "tooltip":
                       "The learned router: each image token sees only its own subject's Redux and reference "
                       "tokens (no blending of similar subjects). auto = on with 2+ subjects, off with one (the "
                       "authors' demo; with one subject it changes nothing and costs time)."}),
            "ref_cache": ("BOOLEAN", {"default": d.ref_cache, "tooltip":
                          "Compute the reference features once per sampling (same image, faster). Off: every "
                          "step, as the authors' enable_ref_cache=False."}),
        }}

    def options(self, redux_scale=0.6, redux_start=0.1, redux_end=0.3, ref_start=0.0, ref_end=1.0, ref_shift=0.0,
                ref_mask=True, router="auto", ref_cache=True):
        _window("redux", redux_start, redux_end)
        _window("ref", ref_start, ref_end)
        if router not in ROUTER_CHOICES:
            raise AnyStoryError(f"router must be one of {ROUTER_CHOICES}, got {router!r}")
        return (FluxOptions(float(redux_scale), float(redux_start), float(redux_end), float(ref_start),
                            float(ref_end), float(ref_shift), bool(ref_mask), router, bool(ref_cache)),)
