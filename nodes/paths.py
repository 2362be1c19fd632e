"""Model folders: ``models/anystory`` (native AnyStory files, IP-Adapter Plus files) and, for IP-Adapter
Plus files users already have, ``models/ipadapter``. Both are registered through folder_paths, so
extra_model_paths.yaml entries ``anystory:`` / ``ipadapter:`` work, and names are resolved only
inside registered folders (no path traversal)."""
from __future__ import annotations

import os

import folder_paths

from .types import AnyStoryError

EXTENSIONS = {".safetensors", ".sft", ".bin", ".pt", ".pth"}
FOLDERS = ("anystory", "ipadapter")


def register() -> None:
    for name in FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, exts = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            folder_paths.folder_names_and_paths[name] = (paths, set(exts) | EXTENSIONS)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(EXTENSIONS))


def list_models() -> list[str]:
    """Files of models/anystory, then models/ipadapter (names as folder_paths gives them)."""
    seen, out = set(), []
    for folder in FOLDERS:
        try:
            names = folder_paths.get_filename_list(folder)
        except KeyError:
            continue
        for n in names:
            if n not in seen:
                seen.add(n)
                out.append(n)
    return out


def resolve(name: str) -> str:
    """Full path of a listed model file; AnyStoryError-style message when it is not there."""
    if not name or name == "none":
        raise AnyStoryError("no AnyStory model file selected")
    for folder in FOLDERS:
        try:
            path = folder_paths.get_full_path(folder, name)
        except KeyError:
            path = None
        if path and os.path.isfile(path):
            return path
    where = "; ".join(p for f in FOLDERS if f in folder_paths.folder_names_and_paths
                      for p in folder_paths.get_folder_paths(f))
    raise AnyStoryError(
        f"AnyStory model file {name!r} was not found in the model folders ({where}). Put the file there "
        "(native AnyStory SDXL or ip-adapter-plus_sdxl_vit-h) and press R in the editor to refresh the list; "
        "names with '..' or absolute paths are not accepted.")
