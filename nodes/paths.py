"""Model folders: ``models/anystory`` (native AnyStory files, IP-Adapter Plus files) and, for IP-Adapter
Plus files users already have, ``models/ipadapter``. Both are registered through folder_paths, so
extra_model_paths.yaml entries ``anystory:`` / ``ipadapter:`` work, and names are resolved only
inside registered folders (no path traversal)."""
from __future__ import annotations

import os

import folder_paths

from ..anystory import checkpoint
from . import state
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


def _full_path(name: str):
    for folder in FOLDERS:
        try:
            path = folder_paths.get_full_path(folder, name)
        except KeyError:
            path = None
        if path and os.path.isfile(path):
            return path
    return None


def is_refnet(name: str) -> bool:
    """Whether the listed file ``name`` is a native ReferenceNet (its safetensors header; cached per file)."""
    path = _full_path(name)
    if path is None:
        return False
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    hit = state.REFNET_FILES.get(key)
    if hit is None:
        hit = state.REFNET_FILES[key] = checkpoint.is_refnet_file(path)
    return hit


def list_refnets() -> list[str]:
    """The ReferenceNet files among :func:`list_models` (adapters and other files left out)."""
    return [n for n in list_models() if is_refnet(n)]


def resolve(name: str) -> str:
    """Full path of a listed model file; AnyStoryError-style message when it is not there."""
    if not name or name == "none":
        raise AnyStoryError("no AnyStory model file selected")
    path = _full_path(name)
    if path is not None:
        return path
    where = "; ".join(p for f in FOLDERS if f in folder_paths.folder_names_and_paths
                      for p in folder_paths.get_folder_paths(f))
    raise AnyStoryError(
        f"AnyStory model file {name!r} was not found in the model folders ({where}). Put the file there "
        "(native AnyStory SDXL or ip-adapter-plus_sdxl_vit-h) and press R in the editor to refresh the list; "
        "names with '..' or absolute paths are not accepted.")
