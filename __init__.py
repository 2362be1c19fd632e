"""comfyui-anystory: AnyStory (arXiv 2501.09503) subject personalization as ComfyUI nodes."""
try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:  # imported outside ComfyUI (e.g. by pytest's rootdir conftest)
    if "comfy" not in str(e) and "folder_paths" not in str(e):
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
