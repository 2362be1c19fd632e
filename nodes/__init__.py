"""ComfyUI node adapters for the AnyStory core. Node type names are public API: never rename them."""
from . import paths

paths.register()

from . import live  # noqa: E402
from .apply import AnyStoryApply, AnyStoryApplySimple  # noqa: E402
from .encode import AnyStorySubjectEncode  # noqa: E402
from .flux.options import AnyStoryFluxOptions  # noqa: E402
from .loader import AnyStoryLoader, AnyStoryModelLoader  # noqa: E402
from .preview import AnyStoryRoutingPreview  # noqa: E402
from .text import AnyStoryTextEncode  # noqa: E402

live.register_routes()  # GET /anystory/palette for the web extension (no-op outside a ComfyUI server)

NODE_CLASS_MAPPINGS = {
    "AnyStoryLoader": AnyStoryLoader,
    "AnyStoryModelLoader": AnyStoryModelLoader,
    "AnyStorySubjectEncode": AnyStorySubjectEncode,
    "AnyStoryApplySimple": AnyStoryApplySimple,
    "AnyStoryApply": AnyStoryApply,
    "AnyStoryRoutingPreview": AnyStoryRoutingPreview,
    "AnyStoryTextEncode": AnyStoryTextEncode,
    "AnyStoryFluxOptions": AnyStoryFluxOptions,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AnyStoryLoader": "AnyStory Loader",
    "AnyStoryModelLoader": "AnyStory Model Loader",
    "AnyStorySubjectEncode": "AnyStory Subject Encode",
    "AnyStoryApplySimple": "AnyStory Apply",
    "AnyStoryApply": "AnyStory Apply (Advanced)",
    "AnyStoryRoutingPreview": "AnyStory Routing Preview",
    "AnyStoryTextEncode": "AnyStory Text Encode (subject words)",
    "AnyStoryFluxOptions": "AnyStory FLUX Options",
}
