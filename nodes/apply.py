"""AnyStoryApply: "routed model patching" — patches a clone of a MODEL so any ComfyUI sampler renders the
subjects, each confined to where the router puts it; returns the routing recorder."""
from __future__ import annotations

from ..anystory.patch.state import NEGATIVE_BACKGROUND, NEGATIVE_ROWS
from ..anystory.routing import MODE_ATTENTION, MODE_AUTO, MODE_MASKS, MODE_MIXED, MODE_ROUTER
from . import checks, live
from .family import family_for
from .sdxl import ApplyOptions
from .types import ANYSTORY, ANYSTORY_FLUX_OPTIONS, ANYSTORY_ROUTING, ANYSTORY_SUBJECTS, AnyStoryError

ROUTER_MODES = (MODE_AUTO, MODE_ROUTER, MODE_ATTENTION, MODE_MASKS, MODE_MIXED)


class AnyStoryApply:
    CATEGORY = "AnyStory"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", ANYSTORY_ROUTING)
    RETURN_NAMES = ("model", "routing")
    OUTPUT_TOOLTIPS = ("A patched copy of the MODEL (the input MODEL is not changed): sample it with any sampler.",
                       "The routing maps of the next sampling with this MODEL, for AnyStoryRoutingPreview.")
    DESCRIPTION = ("Patches an SDXL or FLUX.1-dev MODEL with AnyStory: each subject's tokens (η) and reference "
                   "features (γ) are routed to the region the router assigns to that subject, so several subjects "
                   "keep their own looks without blending. Stacks with IPAdapter (before or after), LoRAs and "
                   "ControlNet. Two AnyStory Apply on one SDXL MODEL: both add their subject tokens; only the first "
                   "keeps its reference features (γ), the second's are left out (a warning says so). FLUX: one "
                   "AnyStory Apply per MODEL; its settings come from the optional AnyStory FLUX Options.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SDXL or FLUX.1-dev MODEL to patch (a copy is patched)."}),
                "anystory": (ANYSTORY, {"tooltip": "From AnyStoryModelLoader — the same one the subjects were "
                                                   "encoded with."}),
                "subjects": (ANYSTORY_SUBJECTS, {"tooltip": "From AnyStorySubjectEncode (chain one per subject)."}),
                "router_mode": (list(ROUTER_MODES), {"default": "auto", "tooltip":
                                "How each region is assigned to a subject. auto: the learned router if the file "
                                "has one, else the attention router (labels), with region masks on top where "
                                "given. router: the learned AnyStory router. attention: training-free, from the "
                                "cross-attention of each subject's label words (positive prompt from AnyStory Text "
                                "Encode). masks: region_masks only (background elsewhere). mixed: region masks "
                                "where given, the router (learned, else attention) elsewhere. FLUX: auto or "
                                "router only (the learned router; AnyStory FLUX Options switches it)."}),
                "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                                  "η — subject strength: weight of the routed subject tokens in cross-attention "
                                  "(eq. 5). 0 = off. FLUX: multiplies redux_scale (the Redux subject tokens)."}),
                "gamma": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                                    "γ — reference strength: how much attention the subject's reference features get "
                                    "in self-attention (eq. 6-8; logit offset ln γ, so 1 = as trained, 0 = off). "
                                    "Keeps details. FLUX: adds ln γ to ref_shift (0 = no reference features)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                            "Sampling progress at which AnyStory starts acting (FLUX: on top of "
                                            "the FLUX options' windows)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                          "Sampling progress at which AnyStory stops acting (FLUX: on top of "
                                          "the FLUX options' windows)."}),
            },
            "optional": {
                "region_masks": ("MASK", {"tooltip": "One mask per subject, in subject order (white = that "
                                                     "subject's region, any size, stretched to the image). Used by "
                                                     "router_mode masks/mixed; an all-black mask leaves that subject "
                                                     "to the router. SDXL only."}),
                "record_routing": ("BOOLEAN", {"default": True, "tooltip": "Keep the routing maps of each sampling "
                                                                           "for the preview (small, kept on the GPU "
                                                                           "until the end of the run)."}),
                "feather": ("INT", {"default": 0, "min": 0, "max": 256, "step": 1, "tooltip":
                                    "Feather the region masks by this many pixels: the subject's injection fades "
                                    "out towards the mask's edge."}),
                "warmup_steps": ("INT", {"default": 2, "min": 0, "max": 100, "tooltip":
                                         "Attention router: steps before routing starts (the layout forms first; "
                                         "meanwhile every token is background)."}),
                "threshold": ("FLOAT", {"default": 0.35, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                        "Attention router: a token belongs to a subject when that subject's "
                                        "normalised word attention there is at least this; else background."}),
                "negative_rows": (list(NEGATIVE_ROWS), {"default": NEGATIVE_BACKGROUND, "tooltip":
                                  "What the negative-prompt rows of CFG get (cfg > 1). 'background only': no subject "
                                  "tokens and no reference features there, so CFG also amplifies the references "
                                  "(strongest likeness; the default). 'same references as positive': they are routed "
                                  "as the positive rows and attend to the same reference features (the paper never "
                                  "drops those in training; only the subject tokens, 10 % of the time), so CFG "
                                  "amplifies the prompt and the subject tokens only: milder details, and more "
                                  "work per step. SDXL only."}),
                "flux_options": (ANYSTORY_FLUX_OPTIONS, {"tooltip":
                                 "FLUX only: the authors' settings (Redux and reference windows and strengths, ref "
                                 "mask, router, ref cache) from AnyStory FLUX Options; absent = their defaults. SDXL "
                                 "ignores it."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},  # the live routing preview in the editor (nodes/live.py)
        }

    def apply(self, model, anystory, subjects, router_mode="auto", eta=1.0, gamma=1.0, start_percent=0.0,
              end_percent=1.0, region_masks=None, record_routing=True, feather=0, warmup_steps=2, threshold=0.35,
              flux_options=None, unique_id=None, negative_rows=NEGATIVE_BACKGROUND):
        anystory = checks.check_model(anystory)
        subjects = checks.check_subjects(subjects, anystory)
        if len(subjects) == 0:
            raise AnyStoryError("no subjects: connect at least one AnyStorySubjectEncode")
        if start_percent > end_percent:
            raise AnyStoryError(f"start_percent ({start_percent}) is after end_percent ({end_percent}): AnyStory would "
                                "never act. Make start_percent ≤ end_percent.")
        options = ApplyOptions(router_mode=router_mode, eta=eta, gamma=gamma, start_percent=start_percent,
                               end_percent=end_percent, region_masks=region_masks, record_routing=record_routing,
                               feather=feather, warmup_steps=warmup_steps, threshold=threshold,
                               negative_rows=negative_rows, flux=flux_options)
        patched, routing = family_for(anystory, model).apply(model, anystory, subjects, options)
        live.attach(routing, unique_id)
        return (patched, routing)
