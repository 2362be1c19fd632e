"""nodes/examples.py: the pack copies the example subject images into ComfyUI's input folder when a
server loads it (missing files only; a user's file of the same name is kept)."""
from __future__ import annotations

import pytest


@pytest.fixture
def examples(pack):
    from comfy_harness import pack_module
    return pack_module("nodes.examples")


def test_install_copies_missing_images_and_keeps_existing_ones(examples, tmp_path):
    names = sorted(p.name for p in examples.example_images())
    assert names == ["anystory_subject_fox.png", "anystory_subject_robot.png"]
    (tmp_path / names[0]).write_bytes(b"the user's own file")
    copied = examples.install(str(tmp_path))
    assert [p.name for p in copied] == names[1:]
    assert (tmp_path / names[0]).read_bytes() == b"the user's own file"
    assert (tmp_path / names[1]).read_bytes() == examples.example_images()[1].read_bytes()
    assert examples.install(str(tmp_path)) == []


def test_install_without_a_server_writes_nothing(examples, monkeypatch, tmp_path):
    """Scripts and in-process tests import the pack too: only a ComfyUI server's load copies."""
    import folder_paths
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    monkeypatch.setattr(examples, "_in_a_server", lambda: False)
    assert examples.install() == [] and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(examples, "_in_a_server", lambda: True)
    assert len(examples.install()) == 2


def test_template_list_puts_the_packs_templates_in_numbered_order(examples):
    """ComfyUI lists example_workflows/ in file-system order; the pack's middleware sorts its own entry."""
    import asyncio
    import json

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    names = ["05_b", "02_a", "06_c", "01_x"]
    assert examples.sort_template_list({"other": ["z", "a"], examples.PACK_FOLDER: names}) == {
        "other": ["z", "a"], examples.PACK_FOLDER: ["01_x", "02_a", "05_b", "06_c"]}

    app = web.Application()
    assert examples.register_template_order(app) is True
    assert examples.register_template_order(app) is False  # once per app
    mw = app.middlewares[-1]

    async def listing(request):
        return web.json_response({examples.PACK_FOLDER: names})

    async def other(request):
        return web.json_response({examples.PACK_FOLDER: names})

    async def go():
        out = {}
        for path, handler in (("/api/workflow_templates", listing), ("/object_info", other)):
            resp = await mw(make_mocked_request("GET", path), handler)
            out[path] = json.loads(resp.body)[examples.PACK_FOLDER]
        return out

    out = asyncio.run(go())
    assert out["/api/workflow_templates"] == sorted(names)
    assert out["/object_info"] == names  # other routes untouched
