"""Every piece of process-wide state the nodes keep between prompts, in one place:

- ``LOADED``: the last AnyStory models the loader built (by file path, mtime and size);
- ``BACKGROUND_FEATURES``: F_clip of the background route's zero image, per CLIP vision model and convention;
- ``ENCODER_GRAPHS``: the encoders' CUDA graphs (ReferenceNet pass, CLIP vision), kept across encodes and
  dropped when an AnyStory sampling starts;
- ``HOST_STAGING``: page-locked host buffers for G_i^l, each prepared while the previous subject is encoded;
- ``REFNET_FILES``: whether a model file is a ReferenceNet (by path, mtime and size), for the loader's list.
"""
from __future__ import annotations

from collections import OrderedDict

from ..anystory.fast.graphs import ForwardGraphs
from ..anystory.fast.transfer import PinnedStaging

LOADED: OrderedDict = OrderedDict()
LOADED_SIZE = 2
BACKGROUND_FEATURES: dict = {}
ENCODER_GRAPHS = ForwardGraphs()
HOST_STAGING = PinnedStaging()
REFNET_FILES: dict = {}
