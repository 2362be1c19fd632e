"""Issue 18, the node side of a new user's first hour: the unified AnyStory Loader finds its files by preset
(and names the missing file and its folder), refnet_name lists only ReferenceNet files, and error messages are
one short sentence that never asks a user to call Python."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from comfy_harness import load_module, model_folders  # registered by tests/nodes/conftest.py

F = load_module("anystory_fixtures", Path(__file__).with_name("anystory_fixtures.py"))

FOLDERS = ("anystory", "ipadapter", "clip_vision", "style_models")


@pytest.fixture(scope="module")
def layout(harness, pack):
    model = harness.tiny_sdxl(seed=0, context_dim=F.CTX)
    return F.pack_mod("anystory.layers").discover_layout(model.model.diffusion_model)


@pytest.fixture
def models(comfy, pack, tmp_path):
    """A models/ tree of its own (anystory, ipadapter, clip_vision, style_models) in folder_paths; restored after."""
    fp = comfy.folder_paths
    paths = F.pack_mod("nodes.paths")
    for k in FOLDERS:
        (tmp_path / k).mkdir()
    with model_folders(fp, {k: ([str(tmp_path / k)], paths.EXTENSIONS if k in paths.FOLDERS
                                else fp.supported_pt_extensions) for k in FOLDERS}):
        yield tmp_path


def _save(sd, path: Path, meta=None):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)


def _touch(path: Path):
    path.write_bytes(b"not read: the loads are stubbed")


@pytest.fixture
def stub_loads(pack, monkeypatch):
    """ComfyUI's CLIP vision / style model loads replaced by records of which file they were given."""
    loader = F.pack_mod("nodes.loader")
    seen = {}
    monkeypatch.setattr(loader, "load_clip_vision", lambda name: seen.setdefault("clip_vision", name))
    monkeypatch.setattr(loader, "load_style_model", lambda name: seen.setdefault("style_model", name))
    return seen


def test_loader_finds_the_public_sdxl_files_by_preset(models, layout, pack, stub_loads):
    syn = F.pack_mod("anystory.synthetic")
    _save(syn.ipadapter_plus_state_dict(layout, num_tokens=4, qformer_dim=64, depth=1),
          models / "ipadapter" / "ip-adapter-plus_sdxl_vit-h.safetensors")
    _save(syn.ipadapter_plus_state_dict(layout, num_tokens=4, qformer_dim=64, depth=1, seed=1),
          models / "ipadapter" / "ip-adapter-plus-face_sdxl_vit-h.safetensors")  # another adapter: not picked
    _touch(models / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    _touch(models / "clip_vision" / "clip_vision_g.safetensors")
    loader = F.pack_mod("nodes.loader")
    node = F.node(pack, "AnyStoryLoader")
    assert list(node.INPUT_TYPES()["required"]["preset"][0]) == list(loader.PRESETS)
    res = node.load(loader.PRESET_SDXL_PUBLIC)
    am, vision, style, info = res["result"]
    assert am.name == "ip-adapter-plus_sdxl_vit-h.safetensors" and am.family == "SDXL"
    assert vision == "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors" and style is None
    assert "CLIP-ViT-H-14" in info and res["ui"]["text"] == [info]


def test_loader_finds_the_flux_set_and_prefers_safetensors(models, pack, stub_loads, monkeypatch):
    loader = F.pack_mod("nodes.loader")
    for name in ("anystory_flux.bin", "anystory_flux.safetensors"):
        _touch(models / "anystory" / name)
    _touch(models / "clip_vision" / "sigclip_vision_patch14_384.safetensors")
    _touch(models / "style_models" / "flux1-redux-dev.safetensors")
    loaded = []
    monkeypatch.setattr(loader, "load_model", lambda name, refnet="none": loaded.append((name, refnet)) or
                        F.pack_mod("nodes.types").AnyStoryModel(name, type("A", (), {"slots": {}, "family": "FLUX"})(),
                                                                None))
    am, vision, style, _ = F.node(pack, "AnyStoryLoader").load(loader.PRESET_FLUX)["result"]
    assert loaded == [("anystory_flux.safetensors", "none")]
    assert vision == "sigclip_vision_patch14_384.safetensors" and style == "flux1-redux-dev.safetensors"


@pytest.mark.parametrize("missing,needle", [("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors in "
                                                           "models/clip_vision"),
                                            ("ipadapter", "ip-adapter-plus_sdxl_vit-h.safetensors in "
                                                         "models/ipadapter")])
def test_loader_names_a_missing_file_and_its_folder(models, layout, pack, stub_loads, missing, needle):
    syn = F.pack_mod("anystory.synthetic")
    if missing != "ipadapter":
        _save(syn.ipadapter_plus_state_dict(layout, num_tokens=4, qformer_dim=64, depth=1),
              models / "ipadapter" / "ip-adapter-plus_sdxl_vit-h.safetensors")
    if missing != "clip_vision":
        _touch(models / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    loader = F.pack_mod("nodes.loader")
    msg = F.raises_pack_error(lambda: F.node(pack, "AnyStoryLoader").load(loader.PRESET_SDXL_PUBLIC), needle)
    assert _one_short_sentence(msg), msg


def test_refnet_list_holds_only_referencenets(models, layout, pack):
    """Point 7: refnet_name lists ReferenceNet files (by their header), not adapters; read once per file."""
    import torch
    syn = F.pack_mod("anystory.synthetic")
    ck = F.pack_mod("anystory.checkpoint")
    state = F.pack_mod("nodes.state")
    _save(syn.ipadapter_plus_state_dict(layout, num_tokens=4, qformer_dim=64, depth=1),
          models / "ipadapter" / "ip-adapter-plus_sdxl_vit-h.safetensors")
    _save({"refnet.input_blocks.0.0.weight": torch.zeros(4, 5, 3, 3)}, models / "anystory" / "my_reference.safetensors")
    _save({"refnet.input_blocks.0.0.weight": torch.zeros(4, 5, 3, 3)}, models / "anystory" / "tagged.safetensors",
          meta={"format": ck.FORMAT_REFNET})
    _touch(models / "anystory" / "broken.safetensors")
    spec = F.node(pack, "AnyStoryModelLoader").INPUT_TYPES()["required"]
    assert spec["refnet_name"][0] == ["none", "my_reference.safetensors", "tagged.safetensors"]
    assert "ip-adapter-plus_sdxl_vit-h.safetensors" in spec["model_name"][0]
    n = len(state.REFNET_FILES)
    F.node(pack, "AnyStoryModelLoader").INPUT_TYPES()
    assert len(state.REFNET_FILES) == n  # cached: the headers are not read again


# ------------------------------------------------------------------------------------------------
# error messages (point 8)
# ------------------------------------------------------------------------------------------------
def _one_short_sentence(msg: str) -> bool:
    return len(msg) < 220 and "()" not in msg


def test_refnet_errors_never_ask_to_call_python_and_stay_short(pack, tmp_path):
    """A whole SDXL UNet given as ReferenceNet, and a file with many stray keys: one sentence a user can act on."""
    import torch
    ck = F.pack_mod("anystory.checkpoint")
    unet = {f"model.diffusion_model.input_blocks.{i}.1.transformer_blocks.0.attn1.to_q.weight": torch.zeros(2, 2)
            for i in range(40)}
    unet["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    _save(unet, tmp_path / "unet.safetensors")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_refnet(str(tmp_path / "unet.safetensors"))
    sentence = str(e.value).split(" (file: ")[0]  # then the full path once
    assert len(sentence) < 250 and "()" not in sentence, sentence
    assert not re.search(r"build_\w+|\.py\b", sentence) and "refnet_name none" in sentence, sentence
    assert "attn2" in e.value.detail and "attn2" not in sentence  # the evidence: in the log, not the message
