"""The test harness itself works against REAL ComfyUI: tiny in-process models sample deterministically,
the headless server starts with this pack loaded, and the random model files go through ComfyUI's
own loaders (CheckpointLoaderSimple, CLIPVisionLoader) in real workflows."""
from __future__ import annotations

import pytest


# ------------------------------------------------------------------------------------------------
# in-process
# ------------------------------------------------------------------------------------------------
def test_tiny_sdxl_is_sdxl_and_samples_deterministically(comfy, harness, tiny_model):
    import torch

    assert isinstance(tiny_model.model, comfy.model_base.SDXL)
    pos, neg = harness.tiny_cond(seed=1), harness.tiny_cond(seed=2)
    latent = torch.zeros(1, 4, 25, 15)  # a 125×75-style odd latent
    a = harness.sample(tiny_model, pos, neg, latent, steps=2, seed=7)
    b = harness.sample(tiny_model, pos, neg, latent, steps=2, seed=7)
    assert a.shape == (1, 4, 25, 15)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), "two runs with the same seed differ"
    assert a.std() > 1e-3, "the tiny model's output is trivial"
    c = harness.sample(tiny_model, pos, neg, latent, steps=2, seed=8)
    assert not torch.equal(a, c), "a different seed gave the same latent"
    # the conditioning matters (the model is non-trivial)
    d = harness.sample(tiny_model, harness.tiny_cond(seed=3), neg, latent, steps=2, seed=7)
    assert (a - d).abs().max() > 1e-4


def test_tiny_sdxl_batch2_and_fresh_models_are_identical(comfy, harness, tiny_model):
    import torch

    pos, neg = harness.tiny_cond(seed=1), harness.tiny_cond(seed=2)
    latent = torch.zeros(2, 4, 25, 15)
    a = harness.sample(tiny_model, pos, neg, latent, steps=2, seed=0)
    assert a.shape == (2, 4, 25, 15) and torch.isfinite(a).all()
    assert (a[0] - a[1]).abs().max() > 1e-3  # per-row noise differs
    b = harness.sample(harness.tiny_sdxl(seed=0), pos, neg, latent, steps=2, seed=0)
    assert torch.equal(a, b), "two tiny models with the same seed differ"


def test_tiny_sdxl_layout(comfy, harness, tiny_model):
    from anystory.layers import discover_layout, layout_from_state_dict

    lay = discover_layout(tiny_model.model.diffusion_model)
    keys = [s.key for s in lay]
    assert keys == [("input", 3, 0), ("input", 5, 0), ("middle", 0, 0),
                    ("output", 0, 0), ("output", 1, 0), ("output", 2, 0), ("output", 3, 0)]
    assert [s.dim for s in lay] == [64, 128, 128, 128, 128, 64, 64]
    assert all(s.dim_head == 16 for s in lay)
    sd_lay = layout_from_state_dict(tiny_model.model.diffusion_model.state_dict(), dim_head=16)
    assert sd_lay.signature() == lay.signature()


def test_tiny_sd15_is_not_sdxl(comfy, harness):
    import torch

    m = harness.tiny_sd15()
    assert type(m.model) is comfy.model_base.BaseModel
    assert not isinstance(m.model, comfy.model_base.SDXL)
    out = harness.sample(m, harness.tiny_cond(pooled=False, seed=1), harness.tiny_cond(pooled=False, seed=2),
                         torch.zeros(1, 4, 16, 16), steps=2)
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_pack_imports_as_custom_node_package(pack):
    assert pack.__name__ == "comfyui_anystory"
    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
    assert isinstance(pack.NODE_DISPLAY_NAME_MAPPINGS, dict)
    assert pack.WEB_DIRECTORY == "./web"


def test_random_models_load_in_process(comfy, server_models_dir, model_files):
    """The small checkpoint is detected as an SDXL-family model and the CLIP-H file as ViT-H."""
    import torch

    from anystory.layers import layout_from_state_dict

    models = server_models_dir / "models"
    sd, _ = comfy.utils.load_torch_file(str(models / "checkpoints" / model_files["checkpoint"]), return_metadata=True)
    import comfy.model_detection as md
    cfg = md.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(cfg).__name__ == "KOALA_700M"
    lay = layout_from_state_dict(sd, prefix="model.diffusion_model.")
    assert len(lay) == 7 and {s.dim for s in lay} == {320}
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in sd)
    assert any(k.startswith("conditioner.embedders.1.model.") for k in sd)
    assert any(k.startswith("first_stage_model.") for k in sd)
    assert all(v.dtype == torch.float16 for k, v in sd.items() if v.is_floating_point() and "position_ids" not in k)
    del sd
    header = comfy.utils.load_torch_file(str(models / "clip_vision" / model_files["clip_vision"]))
    assert "vision_model.encoder.layers.31.layer_norm1.weight" in header
    assert "vision_model.encoder.layers.32.layer_norm1.weight" not in header
    assert header["vision_model.embeddings.position_embedding.weight"].shape == (257, 1280)


# ------------------------------------------------------------------------------------------------
# the real server
# ------------------------------------------------------------------------------------------------
def test_server_lists_standard_nodes_and_pack_imported(comfy_server, model_files):
    info = comfy_server.object_info()
    for n in ("KSampler", "CheckpointLoaderSimple", "CLIPVisionLoader", "CLIPVisionEncode", "LoadImage", "SaveImage"):
        assert n in info, n
    assert comfy_server.pack_import_errors() == [], "\n".join(comfy_server.pack_import_errors())
    assert "custom_nodes/comfyui-anystory" in comfy_server.log_text()  # ComfyUI did try our pack
    ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert model_files["checkpoint"] in ckpts
    cvs = info["CLIPVisionLoader"]["input"]["required"]["clip_name"][0]
    assert model_files["clip_vision"] in cvs


def test_server_rejects_invalid_prompt_with_node_errors(comfy_server, harness, model_files):
    wf = harness.txt2img_workflow("no-such-checkpoint.safetensors")
    with pytest.raises(harness.PromptRejected) as ei:
        comfy_server.queue_prompt(wf)
    err = ei.value
    assert err.status == 400
    assert "1" in err.node_errors
    assert any("no-such-checkpoint" in m for m in err.messages()), err.messages()


def test_server_txt2img_with_random_checkpoint(comfy_server, harness, model_files):
    from PIL import Image

    wf = harness.txt2img_workflow(model_files["checkpoint"], width=64, height=64, steps=2, seed=3,
                                  prefix="harness_txt2img")
    entry = comfy_server.run(wf, timeout=240)
    files = comfy_server.output_files(entry)
    assert len(files) == 1 and files[0].is_file(), files
    im = Image.open(files[0])
    assert im.size == (64, 64)
    lo, hi = im.convert("L").getextrema()
    assert hi > lo, "the random checkpoint rendered a constant image"


def test_server_clip_vision_encode_with_random_clip_h(comfy_server, model_files):
    from PIL import Image

    inp = comfy_server.base_dir / "input" / "harness_subject.png"
    Image.new("RGB", (96, 64), (200, 30, 60)).save(inp)
    wf = {
        "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": model_files["clip_vision"]}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "harness_subject.png"}},
        "3": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["1", 0], "image": ["2", 0], "crop": "center"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    }
    entry = comfy_server.run(wf, timeout=240)
    text = entry["outputs"]["4"]["text"]
    assert text and "Output" in str(text[0]), text
