"""The nodes as a user meets them: a real ComfyUI server's /object_info, the shipped workflows in both
formats, and renders queued through POST /prompt on random-weight files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_harness import load_module as _load  # registered by tests/nodes/conftest.py

REPO = Path(__file__).resolve().parents[2]
NODES = ("AnyStoryModelLoader", "AnyStorySubjectEncode", "AnyStoryApply", "AnyStoryRoutingPreview",
         "AnyStoryTextEncode", "AnyStoryFluxOptions", "AnyStoryLoader", "AnyStoryApplySimple")
SOCKET_TYPES = {"MODEL", "CLIP", "VAE", "CLIP_VISION", "IMAGE", "MASK", "LATENT", "CONDITIONING",
                "ANYSTORY", "ANYSTORY_SUBJECTS", "ANYSTORY_ROUTING", "STYLE_MODEL", "ANYSTORY_FLUX_OPTIONS"}




@pytest.fixture(scope="module")
def workflows_mod():
    return _load("build_workflows", REPO / "scripts" / "build_workflows.py")


@pytest.fixture(scope="module")
def demo_mod():
    return _load("anystory_demo", REPO / "scripts" / "demo.py")


@pytest.fixture(scope="module")
def info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def subjects_in_input(comfy_server, demo_mod):
    return demo_mod.draw_subjects(comfy_server.base_dir / "input")


def _inputs(entry):
    out = {}
    for group in ("required", "optional"):
        for name, spec in (entry["input"].get(group) or {}).items():
            out[name] = (group, spec)
    return out


def test_pack_loads_without_import_errors(comfy_server, info):
    assert comfy_server.pack_import_errors() == []
    for n in NODES:
        assert n in info, f"{n} missing from /object_info"
        assert info[n]["category"] == "AnyStory"


def test_object_info_matches_the_node_classes(info, pack):
    """Every node's INPUT_TYPES as the live server publishes it: same names, groups, types; a tooltip on
    every input; the documented outputs."""
    for n in NODES:
        cls = pack.NODE_CLASS_MAPPINGS[n]
        local = cls.INPUT_TYPES()
        live = _inputs(info[n])
        mine = {}
        for group in ("required", "optional"):
            for name, spec in (local.get(group) or {}).items():
                mine[name] = (group, spec)
        assert set(live) == set(mine), n
        for name, (group, spec) in mine.items():
            lgroup, lspec = live[name]
            assert lgroup == group, (n, name)
            typ = spec[0]
            if isinstance(typ, (list, tuple)):
                assert isinstance(lspec[0], list), (n, name)
            else:
                assert lspec[0] == typ, (n, name)
            opts = spec[1] if len(spec) > 1 else {}
            assert opts.get("tooltip"), f"{n}.{name} has no tooltip"
        assert list(info[n]["output"]) == list(cls.RETURN_TYPES)
        assert list(info[n]["output_name"]) == list(cls.RETURN_NAMES)
    loader = info["AnyStoryModelLoader"]["input"]["required"]
    assert any("anystory_sdxl" in f for f in loader["model_name"][0]), "models/anystory not listed"
    assert any("ip-adapter-plus" in f for f in loader["model_name"][0]), "models/ipadapter not listed"
    assert any("anystory_flux" in f for f in loader["model_name"][0]), "the AnyStory FLUX file not listed"


def _widget_names(entry) -> list:
    names = []
    for group in ("required", "optional"):
        for name, spec in (entry["input"].get(group) or {}).items():
            typ = spec[0]
            if isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
                opts = spec[1] if len(spec) > 1 else {}
                if opts.get("control_after_generate"):
                    names.append("control_after_generate")
                if opts.get("image_upload"):
                    names.append("upload")
    return names


TEMPLATES = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))


@pytest.mark.parametrize("name", TEMPLATES)
def test_ui_workflow_fits_the_live_nodes(name, info, workflows_mod):
    """The drag-and-drop graph: every node type exists, widget values line up with the live widget
    order, links join existing sockets of matching types."""
    wf = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    api = json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert {str(i) for i in nodes} == set(api), "UI and API graphs differ"
    for nid, n in nodes.items():
        assert n["type"] in info, f"node type {n['type']} unknown to the server"
        widgets = _widget_names(info[n["type"]])
        assert len(n["widgets_values"]) == len(widgets), (n["type"], widgets, n["widgets_values"])
        for wname, value in zip(widgets, n["widgets_values"]):
            if wname in ("control_after_generate", "upload"):
                continue
            assert api[str(nid)]["inputs"][wname] == value, (n["type"], wname)
            spec = _inputs(info[n["type"]])[wname][1]
            if isinstance(spec[0], list) and n["type"].startswith("AnyStory"):
                assert value in spec[0] or wname in ("model_name", "refnet_name"), (n["type"], wname, value)
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert src in nodes and dst in nodes
        assert info[nodes[src]["type"]]["output"][src_slot] == typ
        assert nodes[dst]["inputs"][dst_slot]["type"] == typ
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
    # the API form links the same sockets
    for nid, node in api.items():
        for k, v in node["inputs"].items():
            if isinstance(v, list):
                assert v[0] in api, (nid, k)


def test_build_workflows_is_in_sync(tmp_path, workflows_mod):
    """example_workflows/ is exactly what scripts/build_workflows.py writes (one description, two formats)."""
    written = workflows_mod.write(tmp_path)
    for p in written:
        rel = p.relative_to(tmp_path)
        assert (REPO / "example_workflows" / rel).read_text() == p.read_text(), f"example_workflows/{rel} is stale"


def _run(server, wf, timeout=900):
    entry = server.run(wf, timeout=timeout)
    return entry, entry.get("outputs", {})


def test_two_subject_workflow_renders_through_prompt(comfy_server, model_files, demo_mod, subjects_in_input):
    """The trained-router template (a native AnyStory file with a learned router; here the random native file)."""
    wf = demo_mod.demo_workflow("06_anystory_sdxl_your_trained_router", model_files, size=64, steps=2)
    entry, outputs = _run(comfy_server, wf)
    saved = comfy_server.output_files(entry)
    assert any(p.name.startswith("anystory_sdxl_trained_router") and p.is_file() for p in saved)
    grid = outputs["50"]["images"]
    assert grid and grid[0]["type"] == "temp"
    assert (comfy_server.base_dir / "temp" / grid[0]["filename"]).is_file()
    crops = [o for k, o in outputs.items() if wf[k]["class_type"] == "AnyStorySubjectEncode"]
    assert len(crops) == 2 and all(o["images"] for o in crops)
    assert {o["anystory_subject"][0]["color"] for o in crops} == {"#e6194b", "#3cb44b"}
    loader_ui = outputs.get("3", {})
    assert "native AnyStory" in " ".join(loader_ui.get("text", []))


def test_flux_two_subject_workflow_renders_through_prompt(comfy_server, model_files, demo_mod, subjects_in_input):
    """The FLUX two-subject graph on random files ComfyUI's own loaders accept: UNETLoader (a 1 + 1 block FLUX.1-dev
    transformer), CLIPLoader type sd3 with CLIP-L (in place of CLIP-L + T5-XXL: see scripts/make_models.py),
    VAELoader (the FLUX VAE), CLIPVisionLoader (SigLIP-384), StyleModelLoader (FLUX.1 Redux), AnyStoryModelLoader
    (anystory_flux.bin) → two subject encodes → AnyStory FLUX Options → AnyStory Apply → KSampler → preview."""
    wf = demo_mod.demo_workflow("05_anystory_flux_two_subjects", model_files, size=64, steps=2)
    assert wf["2"]["class_type"] == "CLIPLoader" and wf["2"]["inputs"]["type"] == "sd3"
    entry, outputs = _run(comfy_server, wf)
    saved = comfy_server.output_files(entry)
    assert any(p.name.startswith("anystory_flux_two_subjects") and p.is_file() for p in saved)
    grid = outputs["50"]["images"]
    assert grid and (comfy_server.base_dir / "temp" / grid[0]["filename"]).is_file()
    encodes = [o for k, o in outputs.items() if wf[k]["class_type"] == "AnyStorySubjectEncode"]
    assert [o["anystory_subject"][0]["reference"] for o in encodes] == ["flux", "flux"]
    assert {o["anystory_subject"][0]["color"] for o in encodes} == {"#e6194b", "#3cb44b"}
    assert "FLUX.1 (1 double + 1 single blocks)" in " ".join(outputs["3"]["text"])
    assert "AnyStory FLUX: 2 subject(s), router on" in comfy_server.log_text()


def test_story_and_one_subject_workflows_render(comfy_server, model_files, demo_mod, subjects_in_input):
    wf = demo_mod.demo_workflow("03_anystory_sdxl_story_4_images", model_files, size=64, steps=1)
    entry, _ = _run(comfy_server, wf)
    names = sorted(p.name for p in comfy_server.output_files(entry))
    for i in range(1, 5):
        assert any(n.startswith(f"anystory_story_{i}") for n in names), names
    wf = demo_mod.demo_workflow("01_anystory_sdxl_one_subject", model_files, size=64, steps=1)
    entry, _ = _run(comfy_server, wf)
    assert comfy_server.output_files(entry)


def test_bad_file_name_is_refused_and_server_keeps_serving(comfy_server, model_files, demo_mod, subjects_in_input):
    wf = demo_mod.demo_workflow("01_anystory_sdxl_one_subject", model_files, size=64, steps=1)
    wf["3"]["inputs"]["model_name"] = "../../etc/passwd"
    status, body = comfy_server.validate(wf)
    assert status == 400
    assert "model_name" in json.dumps(body)
    ok = demo_mod.demo_workflow("01_anystory_sdxl_one_subject", model_files, size=64, steps=1)
    entry, _ = _run(comfy_server, ok)
    assert comfy_server.output_files(entry)


def test_public_weights_workflow_routes_with_the_attention_router(comfy_server, model_files, demo_mod,
                                                                  subjects_in_input):
    """IP-Adapter Plus file + shared-UNet ReferenceNet + attention router, through /prompt."""
    wf = demo_mod.demo_workflow("02_anystory_sdxl_two_subjects", model_files, size=64, steps=4)
    entry, outputs = _run(comfy_server, wf)
    assert comfy_server.output_files(entry)
    info = " ".join(outputs["3"]["text"])
    assert "public IP-Adapter Plus" in info and "training-free" in info
    refs = {o["anystory_subject"][0]["reference"] for k, o in outputs.items()
            if wf[k]["class_type"] == "AnyStorySubjectEncode"}
    assert refs == {"shared"}
    assert outputs["50"]["images"]
    log = comfy_server.log_text()
    assert "router attention" in log
    assert "label positions in the prompt" in log


def test_label_missing_from_prompt_is_a_clear_error(comfy_server, model_files, demo_mod, subjects_in_input):
    wf = demo_mod.demo_workflow("02_anystory_sdxl_two_subjects", model_files, size=64, steps=1)
    wf["22"]["inputs"]["text"] = "a cat and a dog in a park"
    entry = comfy_server.run(wf, timeout=600, expect_success=False)
    err = comfy_server_error(entry)
    assert err is not None and err["node_type"] == "AnyStoryTextEncode"
    assert "'the fox'" in err["exception_message"] and "do not occur in the prompt" in err["exception_message"]
    # the server keeps serving: the same graph with a fitting prompt renders
    ok = demo_mod.demo_workflow("02_anystory_sdxl_two_subjects", model_files, size=64, steps=1)
    assert comfy_server.output_files(_run(comfy_server, ok)[0])


def comfy_server_error(entry):
    import comfy_harness as H
    return H.execution_error(entry)


def test_first_hour_loader_mask_warning_and_old_names_through_prompt(comfy_server, model_files):
    """Issue 18 through /prompt: the AnyStory Loader's public SDXL preset finds the (random) public files by name; a
    JPEG (no alpha) through LoadImage → InvertMask is an all-white mask: the encode node warns, and the warning is
    in /history; an AnyStory Apply (Advanced) given the old input names eta / gamma / warmup_steps / threshold (an
    older API client) validates, and eta reaches the patch as subject_strength."""
    from PIL import Image
    Image.new("RGB", (96, 80), (200, 40, 30)).save(comfy_server.base_dir / "input" / "first_hour.jpg")
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model_files["checkpoint"]}},
        "3": {"class_type": "AnyStoryLoader", "inputs": {"preset": "SDXL · public (IP-Adapter Plus ViT-H)"}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "first_hour.jpg"}},
        "11": {"class_type": "InvertMask", "inputs": {"mask": ["10", 1]}},
        "20": {"class_type": "AnyStorySubjectEncode", "inputs": {
            "anystory": ["3", 0], "clip_vision": ["3", 1], "vae": ["1", 2], "image": ["10", 0], "mask": ["11", 0],
            "label": "the fox", "strength": 1.0, "reference": "off"}},
        "30": {"class_type": "AnyStoryApply", "inputs": {
            "model": ["1", 0], "anystory": ["3", 0], "subjects": ["20", 0], "router_mode": "attention", "eta": 0.55,
            "gamma": 0.0, "start_percent": 0.0, "end_percent": 1.0, "warmup_steps": 1, "threshold": 0.3}},
        "40": {"class_type": "PreviewAny", "inputs": {"source": ["30", 1]}},
    }
    entry, outputs = _run(comfy_server, wf, timeout=600)
    info = " ".join(outputs["3"]["text"])
    assert "ip-adapter-plus_sdxl_vit-h" in info and "CLIP-ViT-H-14" in info, info
    warnings = outputs["20"]["warnings"]
    assert len(warnings) == 1 and "all white" in warnings[0] and "RMBG" in warnings[0], warnings
    assert outputs["20"]["anystory_subject"][0]["warnings"] == warnings
    assert "40" in outputs
    assert "router attention, η=0.55 γ=0.00" in comfy_server.log_text()
