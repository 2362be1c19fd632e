"""The shipped examples, for a ComfyUI server that loads the pack:

- the example subject images the templates name (assets/subjects/*.png, drawn by scripts/make_examples.py)
  are copied into ComfyUI's input folder if a file of that name is not there yet, so the templates'
  LoadImage nodes pass validation on the first Run (a user's file of the same name is never replaced);
- the pack's templates (example_workflows/, numbered so the ones that run on public files come first) are
  listed in that order by GET /workflow_templates: ComfyUI lists a folder in file-system order, and the
  template browser keeps the order it gets."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import folder_paths

log = logging.getLogger("anystory")

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "subjects"
# the pack's folder name under custom_nodes (not resolved: a linked checkout is listed under the link's name)
PACK_FOLDER = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE_ROUTES = ("/workflow_templates", "/api/workflow_templates")
_ORDERED_APPS: set = set()


def example_images() -> list[Path]:
    return sorted(ASSETS.glob("*.png"))


def _prompt_server():
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


def _in_a_server() -> bool:
    return _prompt_server() is not None


def sort_template_list(data: dict, folder: str = PACK_FOLDER) -> dict:
    """The /workflow_templates answer with this pack's template names in name order (others untouched)."""
    if isinstance(data, dict) and isinstance(data.get(folder), list):
        data = dict(data)
        data[folder] = sorted(data[folder])
    return data


def register_template_order(app=None) -> bool:
    """Add a middleware to the server's web app that puts this pack's templates in name order in the
    /workflow_templates answer. False when there is no app or it is already running."""
    from aiohttp import web

    app = app if app is not None else getattr(_prompt_server(), "app", None)
    if app is None or getattr(app, "frozen", True) or id(app) in _ORDERED_APPS:
        return False

    @web.middleware
    async def anystory_template_order(request, handler):
        resp = await handler(request)
        if request.path in TEMPLATE_ROUTES and getattr(resp, "content_type", "") == "application/json":
            try:
                return web.json_response(sort_template_list(json.loads(resp.body)))
            except (TypeError, ValueError, AttributeError):
                return resp
        return resp

    try:
        app.middlewares.append(anystory_template_order)
        _ORDERED_APPS.add(id(app))
    except Exception as e:  # noqa: BLE001 — never stop the pack from loading for the template order
        log.warning("[AnyStory] could not order the templates (%s)", e)
        return False
    return True


def install(input_dir: Optional[str] = None) -> list[Path]:
    """Copy the missing example images into ``input_dir`` (default: ComfyUI's input folder, and only when
    the pack is loaded by a ComfyUI server, not by scripts or in-process tests); returns the files copied.
    Failures (a read-only folder) are logged, never raised: the pack loads anyway."""
    copied = []
    if input_dir is None and not _in_a_server():
        return copied
    try:
        dst_dir = Path(input_dir or folder_paths.get_input_directory())
        dst_dir.mkdir(parents=True, exist_ok=True)
        for src in example_images():
            dst = dst_dir / src.name
            if dst.exists() or dst.is_symlink():
                continue
            shutil.copyfile(src, dst)
            copied.append(dst)
    except Exception as e:  # noqa: BLE001 — a read-only folder, an odd set-up: the pack loads anyway
        log.warning("[AnyStory] could not copy the example subject images into ComfyUI's input folder (%s); "
                    "the example workflows will ask for them: copy %s/*.png there", e, ASSETS)
    if copied:
        log.info("[AnyStory] example subject images copied to %s: %s", copied[0].parent,
                 ", ".join(p.name for p in copied))
    return copied
