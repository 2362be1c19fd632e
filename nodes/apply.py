"""AnyStoryApply ("AnyStory Apply (Advanced)") and AnyStoryApplySimple ("AnyStory Apply"): "routed model
patching" — patches a clone of a MODEL so any ComfyUI sampler renders the subjects, each confined to where the
router puts it; returns the routing recorder. Widget names are user words; in the code subject_strength is η
(eq. 5), detail_strength γ (eq. 6-8)."""
from __future__ import annotations

import logging

from ..anystory.attention_router import DEFAULT_WARMUP
from ..anystory.patch.state import NEGATIVE_BACKGROUND, NEGATIVE_ROWS
from ..anystory.routing import MODE_ATTENTION, MODE_AUTO, MODE_MASKS, MODE_MIXED, MODE_ROUTER
from . import checks, live
from .family import family_for
from .sdxl import ApplyOptions
from .types import ANYSTORY, ANYSTORY_FLUX_OPTIONS, ANYSTORY_ROUTING, ANYSTORY_SUBJECTS, AnyStoryError

ROUTER_MODES = (MODE_AUTO, MODE_ROUTER, MODE_ATTENTION, MODE_MASKS, MODE_MIXED)

log = logging.getLogger("anystory")


# inputs renamed to user words (issue 18): old name → new name. Saved UI workflows keep working (widget values are
# stored by position, and the order and types are unchanged); API prompts with the old names are read through
# hidden inputs of the old names.
OLD_NAMES = {"eta": "subject_strength", "gamma": "detail_strength", "warmup_steps": "region_warmup",
             "threshold": "region_threshold"}

SUBJECT_STRENGTH = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                    "How strongly the subjects' looks are put into the image (1 = as trained, 0 = off). Each "
                    "subject's own strength on its Subject Encode multiplies this. FLUX: scales the Redux subject "
                    "tokens."})
DETAIL_STRENGTH = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                   "How much of each subject's fine detail (face, texture, print) is copied from its reference image "
                   "(1 = as trained, 0 = off, higher = closer copies). FLUX: the weight of the reference features."})
START = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
         "When AnyStory starts acting, as a share of the sampling (0 = from the first step). FLUX: on top of the "
         "FLUX options' windows."})
END = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
       "When AnyStory stops acting, as a share of the sampling (1 = until the last step). FLUX: on top of the FLUX "
       "options' windows."})


def _pick(new, old, name: str, default):
    """The value of a renamed input: the new name's, else the old name's (older API prompts), else the default."""
    if new is not None:
        if old is not None and old != new:
            log.warning("AnyStory: both %r and its old name %r were given; using %s = %s", OLD_NAMES.get(name, name),
                        name, OLD_NAMES.get(name, name), new)
        return new
    return default if old is None else old


def warmup_setting(region_warmup, warmup_steps) -> tuple:
    """(share of the steps, fixed steps or None) from region_warmup (0-1: a share; 1 or more: steps, as older UI
    workflows stored the value) or the old API input warmup_steps (steps)."""
    if region_warmup is None and warmup_steps is not None:
        return DEFAULT_WARMUP, int(warmup_steps)
    value = DEFAULT_WARMUP if region_warmup is None else float(region_warmup)
    if value >= 1.0:
        return DEFAULT_WARMUP, int(round(value))
    return value, None


class AnyStoryApply:
    CATEGORY = "AnyStory"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", ANYSTORY_ROUTING)
    RETURN_NAMES = ("model", "routing")
    OUTPUT_TOOLTIPS = ("A patched copy of the MODEL (the input MODEL is not changed): sample it with any sampler.",
                       "The routing maps of the next sampling with this MODEL, for AnyStory Routing Preview.")
    DESCRIPTION = ("Patches an SDXL or FLUX.1-dev MODEL with AnyStory: each subject's look and detail are put only "
                   "into the region the router assigns to that subject, so several subjects keep their own looks "
                   "without blending. All settings (router mode, region masks, warm-up); AnyStory Apply has the "
                   "few most used. Stacks with IPAdapter (before or after), LoRAs and ControlNet. Two AnyStory "
                   "Apply on one SDXL MODEL: both add their subjects; only the first keeps its detail features, the "
                   "second's are left out (a warning says so). FLUX: one AnyStory Apply per MODEL; its settings come "
                   "from the optional AnyStory FLUX Options.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SDXL or FLUX.1-dev MODEL to patch (a copy is patched)."}),
                "anystory": (ANYSTORY, {"tooltip": "From the AnyStory Loader — the same one the subjects were "
                                                   "encoded with."}),
                "subjects": (ANYSTORY_SUBJECTS, {"tooltip": "From AnyStory Subject Encode (chain one per subject)."}),
                "router_mode": (list(ROUTER_MODES), {"default": "auto", "tooltip":
                                "How each region of the image is given to a subject. auto: the learned router if the "
                                "file has one, else the subjects' words in the prompt, with region masks on top where "
                                "given. router: the learned AnyStory router. attention: from where each subject's "
                                "label words look in the image (positive prompt from AnyStory Text Encode). masks: "
                                "region_masks only (background elsewhere). mixed: region masks where given, the "
                                "router (learned, else words) elsewhere. FLUX: auto or router only (AnyStory FLUX "
                                "Options switches it)."}),
            },
            # optional (with defaults) so that API prompts with the old names still validate; the widget order and
            # types are those of older versions, so saved workflows load their values into the right widgets
            "optional": {
                "subject_strength": SUBJECT_STRENGTH,
                "detail_strength": DETAIL_STRENGTH,
                "start_percent": START,
                "end_percent": END,
                "region_masks": ("MASK", {"tooltip": "One mask per subject, in subject order (white = that "
                                                     "subject's region, any size, stretched to the image). Used by "
                                                     "router_mode masks/mixed; an all-black mask leaves that subject "
                                                     "to the router. SDXL only."}),
                "record_routing": ("BOOLEAN", {"default": True, "tooltip": "Keep the routing maps of each sampling "
                                                                           "for the preview (small, kept on the GPU "
                                                                           "until the end of the run)."}),
                "feather": ("INT", {"default": 0, "min": 0, "max": 256, "step": 1, "tooltip":
                                    "Feather the region masks by this many pixels: the subject fades out towards the "
                                    "mask's edge."}),
                "region_warmup": ("FLOAT", {"default": DEFAULT_WARMUP, "min": 0.0, "max": 100.0, "step": 0.05,
                                            "tooltip": "Routing by the subjects' words: the share of the sampling "
                                            "steps before regions are given to subjects (the layout forms first). "
                                            "0.1 = 2 of 20 steps, 0 of 4; 0 = as early as possible (the second "
                                            "step). 1 or more = a number of steps (older workflows)."}),
                "region_threshold": ("FLOAT", {"default": 0.35, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                               "Routing by the subjects' words: how clearly a spot must belong to a "
                                               "subject's words to be given to that subject; lower = larger "
                                               "regions, higher = more background."}),
                "negative_rows": (list(NEGATIVE_ROWS), {"default": NEGATIVE_BACKGROUND, "tooltip":
                                  "What the negative-prompt rows of CFG get (cfg > 1). 'background only': no subject "
                                  "pictures and no subject details there, so CFG also strengthens the details "
                                  "(strongest likeness; the default). 'same references as positive': the negative "
                                  "rows also see each subject's details, so CFG strengthens the prompt and the "
                                  "subject pictures only: milder details, and more work per step. SDXL only."}),
                "flux_options": (ANYSTORY_FLUX_OPTIONS, {"tooltip":
                                 "FLUX only: the authors' settings (Redux and reference windows and strengths, ref "
                                 "mask, router, ref cache) from AnyStory FLUX Options; absent = their defaults. SDXL "
                                 "ignores it."}),
            },
            # unique_id: the live routing preview in the editor (nodes/live.py); the rest: the old input names
            "hidden": {"unique_id": "UNIQUE_ID", "eta": "FLOAT", "gamma": "FLOAT", "warmup_steps": "INT",
                       "threshold": "FLOAT"},
        }

    def apply(self, model, anystory, subjects, router_mode="auto", subject_strength=None, detail_strength=None,
              start_percent=0.0, end_percent=1.0, region_masks=None, record_routing=True, feather=0,
              region_warmup=None, region_threshold=None, flux_options=None, unique_id=None, eta=None, gamma=None,
              warmup_steps=None, threshold=None, negative_rows=NEGATIVE_BACKGROUND):
        anystory = checks.check_model(anystory)
        subjects = checks.check_subjects(subjects, anystory)
        if len(subjects) == 0:
            raise AnyStoryError("no subjects: connect at least one AnyStory Subject Encode")
        if start_percent > end_percent:
            raise AnyStoryError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): AnyStory would "
                                "never act. Make start_percent ≤ end_percent.")
        warmup, fixed = warmup_setting(region_warmup, warmup_steps)
        options = ApplyOptions(router_mode=router_mode, eta=_pick(subject_strength, eta, "eta", 1.0),
                               gamma=_pick(detail_strength, gamma, "gamma", 1.0), start_percent=start_percent,
                               end_percent=end_percent, region_masks=region_masks, record_routing=record_routing,
                               feather=feather, warmup=warmup, warmup_steps=fixed,
                               threshold=_pick(region_threshold, threshold, "threshold", 0.35),
                               negative_rows=negative_rows, flux=flux_options)
        patched, routing = family_for(anystory, model).apply(model, anystory, subjects, options)
        live.attach(routing, unique_id)
        return (patched, routing)


class AnyStoryApplySimple:
    """The few settings most users touch; everything else as AnyStoryApply's defaults (router_mode auto)."""

    CATEGORY = "AnyStory"
    FUNCTION = "apply"
    RETURN_TYPES = AnyStoryApply.RETURN_TYPES
    RETURN_NAMES = AnyStoryApply.RETURN_NAMES
    OUTPUT_TOOLTIPS = AnyStoryApply.OUTPUT_TOOLTIPS
    DESCRIPTION = ("Puts the encoded subjects into a MODEL (SDXL or FLUX.1-dev): each subject appears only where it "
                   "belongs, keeping its own look. The router chooses the regions (the learned router, else each "
                   "subject's label words: encode the prompt with AnyStory Text Encode). Region masks, router mode and "
                   "warm-up: AnyStory Apply (Advanced).")

    @classmethod
    def INPUT_TYPES(cls):
        adv = AnyStoryApply.INPUT_TYPES()
        return {
            "required": {
                "model": adv["required"]["model"],
                "anystory": adv["required"]["anystory"],
                "subjects": adv["required"]["subjects"],
                "subject_strength": SUBJECT_STRENGTH,
                "detail_strength": DETAIL_STRENGTH,
                "start_percent": START,
                "end_percent": END,
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def apply(self, model, anystory, subjects, subject_strength=1.0, detail_strength=1.0, start_percent=0.0,
              end_percent=1.0, unique_id=None):
        return AnyStoryApply().apply(model, anystory, subjects, "auto", subject_strength, detail_strength,
                                     start_percent, end_percent, unique_id=unique_id)
