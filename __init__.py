"""comfyui-anystory: AnyStory (arXiv 2501.09503) subject personalization as ComfyUI nodes."""
NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
if __package__:  # imported as a package: by ComfyUI (custom_nodes/<folder>), or by pytest from the repo root
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
        from .nodes import examples as _examples

        _examples.install()  # the example subject images the shipped workflows name, into input/ if missing
        _examples.register_template_order()  # the template browser lists the templates in their numbered order
    except ImportError as e:  # imported outside ComfyUI (e.g. by pytest's rootdir conftest)
        if "comfy" not in str(e) and "folder_paths" not in str(e):
            raise
# else: loaded as a plain file (pytest in a checkout whose folder name is no Python identifier, e.g.
# "comfyui-anystory"): there is no package to import the nodes from, and the tests do not need them here

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
