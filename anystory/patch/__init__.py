"""The routed model patch: encode → route → inject → record, across the layers of one model call.

- :mod:`.state` — what one AnyStory Apply fixes (RoutingInputs) and what one model call carries from
  layer to layer (CallState); family-independent;
- :mod:`.run`   — the caches of one sampling run;
- :mod:`.kv`    — the route K/V of eq. 5 and the reference K/V of eq. 6-8;
- :mod:`.sdxl`  — the UNet family (SDXL): routing at every cross-attention layer, eq. 5 at attn2 and
  eq. 6-8 at attn1 (:class:`RoutedPatch`).

Routing sources live in anystory.routing; the recorder in anystory.recorder.
"""
from .sdxl import RoutedPatch
from .state import NEGATIVE_BACKGROUND, NEGATIVE_REFERENCES, NEGATIVE_ROWS, CallState, RoutingInputs, chunks_from_roles

__all__ = ["CallState", "RoutedPatch", "RoutingInputs", "chunks_from_roles", "NEGATIVE_BACKGROUND",
           "NEGATIVE_REFERENCES", "NEGATIVE_ROWS"]
