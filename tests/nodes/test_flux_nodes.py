"""AnyStory FLUX through the pack's node classes, in-process against real ComfyUI (the tiny FLUX of the goldens):
the loader recognises the authors' file and its conversion; cross-family wiring is refused naming both families;
AnyStoryModelLoader → AnyStorySubjectEncode ×2 → AnyStoryFluxOptions → AnyStoryApply → ComfyUI's sampler
reproduces the AUTHORS' final latents and routing maps (tests/goldens/flux); each option of the authors' generate()
changes the image where theirs does; the routing preview renders FLUX runs; the input MODEL is never changed.

The encoders' inputs are the goldens' own: the CLIP vision stand-in returns the authors' SigLIP hidden states, the
VAE stand-in the authors' reference latent, and the token masks are the authors' (their pooling is held to the
authors' formula in tests/anystory/flux); the Redux STYLE_MODEL is ComfyUI's ``ReduxImageEncoder`` with the goldens'
Redux weights; everything from there on is the pack's node path.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from comfy_harness import load_module, model_folders  # registered by tests/nodes/conftest.py

ff = load_module("flux_fixtures", Path(__file__).with_name("flux_fixtures.py"))
F = load_module("anystory_fixtures", Path(__file__).with_name("anystory_fixtures.py"))

temp_dir = F.temp_dir  # ComfyUI's temp folder for the preview PNGs (fixture)
STEPS = 4
BIN = "anystory_flux_tiny.bin"
SFT = "anystory_flux_tiny.safetensors"


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_model(comfy):
    return ff.tiny_flux(comfy)


@pytest.fixture(scope="module")
def models_dir(comfy, pack, tmp_path_factory):
    """models/anystory with the goldens' random AnyStory FLUX file (.bin) and its safetensors conversion."""
    fp = comfy.folder_paths
    paths = F.pack_mod("nodes.paths")
    ckpt = F.pack_mod("anystory.flux.checkpoint")
    d = tmp_path_factory.mktemp("flux-models")
    shutil.copyfile(ff.GOLDEN / BIN, d / BIN)
    parts, alphas = ckpt.read_flux_parts(str(d / BIN))
    ckpt.save_flux_safetensors(parts, str(d / SFT), alphas=alphas)
    with model_folders(fp, {"anystory": ([str(d)], paths.EXTENSIONS),
                            "ipadapter": ([str(d / "none")], paths.EXTENSIONS)}):
        yield d


@pytest.fixture(scope="module")
def anystory(pack, models_dir):
    am, info = F.node(pack, "AnyStoryModelLoader").load(BIN)["result"]
    return am


@pytest.fixture(scope="module")
def redux(comfy):
    """ComfyUI's STYLE_MODEL of FLUX.1 Redux with the goldens' (tiny) Redux weights."""
    import comfy.ldm.flux.redux
    import comfy.sd
    base = ff.redux_base()
    m = comfy.ldm.flux.redux.ReduxImageEncoder(redux_dim=base["redux_up.weight"].shape[1],
                                               txt_in_features=base["redux_down.weight"].shape[0])
    m.load_state_dict(base)
    return comfy.sd.StyleModel(m)


class GoldenSiglip:
    """CLIP_VISION stand-in: the authors' SigLIP last hidden state of subject k (``image_size`` as SigLIP-384)."""

    image_size = 384

    def __init__(self, k: int, current: dict):
        self.k, self.current = k, current

    def encode_image(self, image, crop=True):
        import comfy.clip_vision
        self.current["k"] = self.k
        out = comfy.clip_vision.Output()
        out["last_hidden_state"] = ff.inputs()[f"subject{self.k}.siglip"].clone()
        return out


class GoldenVAE:
    """VAE stand-in: the authors' reference latent of subject k, as ComfyUI's FLUX VAE returns it (before the
    model's latent format: x / 0.3611 + 0.1159)."""

    latent_channels = 16

    def __init__(self, k: int):
        self.k = k

    def encode(self, pixels):
        s = ff.config()["ref_size"] // 8
        packed = ff.inputs()[f"subject{self.k}.ref_latents_packed"]
        return ff.unpack(packed, s, s) / 0.3611 + 0.1159


@pytest.fixture
def golden_masks(pack, monkeypatch):
    """The token masks of the goldens (the authors' pooling of their masks) for the subject being encoded."""
    fam = F.pack_mod("nodes.flux.family")
    current = {"k": 0}
    inp = ff.inputs()
    ref_grid = ff.config()["ref_size"] // 16

    def token_mask(mask, grid=27):
        k = current["k"]
        return (inp[f"subject{k}.ref_mask"] if grid == ref_grid else inp[f"subject{k}.token_mask"]).clone()

    monkeypatch.setattr(fam, "siglip_token_mask", token_mask)
    return current


def _image(seed=0, size=(96, 80)):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, size[0], size[1], 3, generator=g)
    mask = torch.zeros(1, *size)
    mask[:, 10:80, 15:60] = 1
    return img, mask


def encode_subjects(pack, anystory, redux, current, n: int, reference: str = "auto"):
    enc = F.node(pack, "AnyStorySubjectEncode")
    subjects = None
    for k in range(n):
        img, mask = _image(k)
        out = enc.encode(anystory, GoldenSiglip(k, current), GoldenVAE(k), img, mask=mask, subjects=subjects,
                         label=f"s{k}", reference=reference, style_model=redux)
        subjects = out["result"][0]
    return subjects


def golden_options(pack, meta: dict, **over):
    kw = dict(redux_scale=meta["redux_scale"], redux_start=meta["redux_start_at"], redux_end=meta["redux_end_at"],
              ref_start=meta["ref_start_at"], ref_end=meta["ref_end_at"], ref_shift=meta["ref_shift"],
              ref_mask=meta["enable_ref_mask"], router="on" if meta["router"] else "off", ref_cache=meta["ref_cache"])
    kw.update(over)
    return F.node(pack, "AnyStoryFluxOptions").options(**kw)[0]


def sample(comfy, model, meta: dict):
    """comfy.sample.sample_custom: euler on the authors' sigmas, cfg 1, FLUX guidance in the conditioning;
    the final latent in the authors' packed, processed form."""
    import comfy.sample
    import comfy.samplers
    inp = ff.inputs()
    cond = [[inp["prompt_embeds"], {"pooled_output": inp["pooled"], "guidance": meta["guidance_scale"]}]]
    noise = ff.unpack(inp["latents_packed"], 16, 16)
    out = comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"), inp["sigmas"],
                                     cond, cond, torch.zeros_like(noise), disable_pbar=True, seed=0)
    lf = model.model.latent_format
    return ff.pack((out - lf.shift_factor) * lf.scale_factor)


def run_nodes(pack, comfy, model, anystory, redux, current, name: str, apply_kw=None, **over):
    golden, meta = ff.case(name)
    subjects = encode_subjects(pack, anystory, redux, current, meta["subjects"])
    opts = golden_options(pack, meta, **over)
    patched, routing = F.node(pack, "AnyStoryApply").apply(model, anystory, subjects, flux_options=opts,
                                                          **(apply_kw or {}))
    return sample(comfy, patched, meta), routing, golden, meta


# ------------------------------------------------------------------------------------------------
# the loader
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [BIN, SFT])
def test_loader_recognises_the_flux_file_and_its_conversion(pack, models_dir, name):
    res = F.node(pack, "AnyStoryModelLoader").load(name)
    am, info = res["result"]
    assert am.family == "FLUX" and "FLUX.1 (2 double + 2 single blocks)" in info
    assert "ReferenceNet" not in info and res["ui"]["text"] == [info]
    w = am.adapter.weights
    lw = next(iter(w.router_lora.values()))  # used every step: loaded with the MODEL by ComfyUI
    assert any(lw.down is p for p in am.adapter.parameters()), "the router LoRA tensors are the patcher's parameters"
    ref = next(iter(w.ref_lora.values()))  # used by the reference pass only: host tensors, sent per call
    assert not any(ref.down is p for p in am.adapter.parameters()) and ref.down.device.type == "cpu"
    with pytest.raises(F.pack_error(), match="no ReferenceNet file"):
        F.node(pack, "AnyStoryModelLoader").load(name, refnet_name=BIN)


def test_the_two_files_give_the_same_weights(pack, models_dir):
    a, _ = F.node(pack, "AnyStoryModelLoader").load(BIN)["result"]
    b, _ = F.node(pack, "AnyStoryModelLoader").load(SFT)["result"]
    wa, wb = a.adapter.weights, b.adapter.weights
    for ga, gb in ((wa.ref_lora, wb.ref_lora), (wa.router_lora, wb.router_lora)):
        assert ga.keys() == gb.keys()
        for k in ga:
            assert torch.equal(ga[k].down, gb[k].down) and torch.equal(ga[k].up, gb[k].up), k
            assert ga[k].scale == gb[k].scale, k
    assert wa.alphas == wb.alphas and a.adapter.nbytes() == b.adapter.nbytes()


# ------------------------------------------------------------------------------------------------
# cross-family wiring and wrong encoders
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl(harness, pack):
    model = harness.tiny_sdxl(seed=0)
    layout = F.pack_mod("anystory.layers").discover_layout(model.model.diffusion_model)
    return model, F.make_anystory(layout)


def test_flux_file_on_an_sdxl_model_is_refused_naming_both(pack, anystory, redux, sdxl, golden_masks):
    sdxl_model, _ = sdxl
    img, mask = _image()
    enc = F.node(pack, "AnyStorySubjectEncode")
    msg = F.raises_pack_error(lambda: enc.encode(anystory, GoldenSiglip(0, golden_masks), GoldenVAE(0), img,
                                                 mask=mask, model=sdxl_model, style_model=redux), "FLUX", "SDXL")
    assert BIN in msg
    subjects = encode_subjects(pack, anystory, redux, golden_masks, 1)
    F.raises_pack_error(lambda: F.node(pack, "AnyStoryApply").apply(sdxl_model, anystory, subjects), "AnyStory FLUX",
                        "SDXL")


def test_sdxl_file_on_a_flux_model_is_refused_naming_both(pack, flux_model, sdxl):
    _, sdxl_am = sdxl
    img, mask = _image()
    enc = F.node(pack, "AnyStorySubjectEncode")
    F.raises_pack_error(lambda: enc.encode(sdxl_am, F.FakeClipVision(), F.FakeVAE(), img, mask=mask,
                                           model=flux_model), "AnyStory SDXL", "FLUX")
    subjects = enc.encode(sdxl_am, F.FakeClipVision(), F.FakeVAE(), img, mask=mask, reference="off")["result"][0]
    F.raises_pack_error(lambda: F.node(pack, "AnyStoryApply").apply(flux_model, sdxl_am, subjects), "AnyStory SDXL",
                        "FLUX")


class ClipH:
    """A CLIP ViT-H/14-like vision model (224 px, 257 tokens × 1280)."""

    def __init__(self, image_size=224):
        self.image_size = image_size

    def encode_image(self, image, crop=True):
        import comfy.clip_vision
        out = comfy.clip_vision.Output()
        out["last_hidden_state"] = torch.zeros(image.shape[0], 257, 1280)
        out["penultimate_hidden_states"] = torch.zeros(image.shape[0], 257, 1280)
        return out


class Siglip:
    """A SigLIP-so400m-like vision model for the SDXL side (729 tokens × 1152)."""

    image_size = 384

    def encode_image(self, image, crop=True):
        import comfy.clip_vision
        out = comfy.clip_vision.Output()
        out["last_hidden_state"] = out["penultimate_hidden_states"] = torch.zeros(image.shape[0], 729, 1152)
        return out


def test_flux_encode_needs_redux_and_siglip_and_sdxl_refuses_siglip(pack, anystory, redux, sdxl, golden_masks):
    img, mask = _image()
    enc = F.node(pack, "AnyStorySubjectEncode")
    F.raises_pack_error(lambda: enc.encode(anystory, GoldenSiglip(0, golden_masks), GoldenVAE(0), img, mask=mask),
                        "FLUX.1 Redux", "style_model", "flux1-redux-dev.safetensors")
    for vision in (ClipH(224), ClipH(384)):  # refused by its size, else by its features
        F.raises_pack_error(lambda: enc.encode(anystory, vision, GoldenVAE(0), img, mask=mask, style_model=redux),
                            "SigLIP", "sigclip_vision_patch14_384.safetensors")
    _, sdxl_am = sdxl
    F.raises_pack_error(lambda: enc.encode(sdxl_am, Siglip(), F.FakeVAE(), img, mask=mask, reference="off"),
                        "1152", "SigLIP", "CLIP-ViT-H-14")
    F.raises_pack_error(lambda: enc.encode(anystory, GoldenSiglip(0, golden_masks), F.FakeVAE(), img, mask=mask,
                                           style_model=redux), "FLUX VAE", "ae.safetensors")


# ------------------------------------------------------------------------------------------------
# the node path against the authors' numbers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["case_2s_router1_cache1", "case_2s_router0_cache0", "case_1s_router0_cache1"])
def test_node_path_matches_the_authors(pack, comfy, flux_model, anystory, redux, golden_masks, name):
    got, routing, golden, meta = run_nodes(pack, comfy, flux_model, anystory, redux, golden_masks, name)
    want = golden["final_latents_packed"]
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"{name}: sampled latent max |Δ| {err:.2e}"
    print(f"\n{name}: node path, final latent max |Δ| {err:.2e} (golden max {want.abs().max().item():.2f})")
    run = routing.runs[-1] if routing.runs else None
    active = [0, 1, 2]  # the goldens' reference window [0, 0.75) of 4 steps; the Redux window is steps 1, 2
    if meta["router"]:
        assert run.step_ids == active
        for step in active:
            for key, (hw, idx, src) in run.steps[step].items():
                kind, i = key
                g = golden[f"step{step}.{kind}{i}.routing"]
                assert hw == (8, 8) and torch.equal(idx[0].long(), g[0].argmax(0)), (name, step, key)
        assert run.layer_order == [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
    elif meta["subjects"] == 1:
        assert run.step_ids == active and all(int(idx.max()) == 0 for _, idx, _ in run.steps[0].values())
    else:
        assert not routing.runs and "router is off" in routing.no_maps_reason
    plain = sample(comfy, flux_model, meta)
    assert (plain - want).abs().max().item() > 100 * err + 1e-3  # AnyStory changed the result


@pytest.mark.parametrize("weight_dtype", ["bfloat16", "float8_e4m3fn"])
def test_low_precision_flux_weights(pack, comfy, flux_model, anystory, redux, golden_masks, weight_dtype):
    """bf16 weights, and fp8 weights cast per call by ComfyUI (manual cast): the node path runs through the model's
    own module calls and drifts from its fp32 result no more than plain FLUX drifts from its own (the tiny random
    model amplifies rounding over the steps: bf16 plain FLUX alone moves ~0.37 relative here)."""
    dtype = getattr(torch, weight_dtype)
    model = ff.tiny_flux(comfy, dtype=dtype, manual_cast_dtype=torch.float32 if dtype.itemsize == 1 else None)
    assert next(model.model.diffusion_model.double_blocks[0].img_attn.qkv.parameters()).dtype == dtype
    got, _, golden, meta = run_nodes(pack, comfy, model, anystory, redux, golden_masks, "case_2s_router1_cache1")
    want = golden["final_latents_packed"]
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    drift_plain = rel(sample(comfy, model, meta), sample(comfy, flux_model, meta))
    assert torch.isfinite(got).all() and rel(got, want) < 1.5 * drift_plain + 0.02, (rel(got, want), drift_plain)


def test_absent_options_are_the_authors_defaults(pack, comfy, flux_model, anystory, redux, golden_masks):
    _, meta = ff.case("case_2s_router1_cache1")
    subjects = encode_subjects(pack, anystory, redux, golden_masks, 2)
    apply = F.node(pack, "AnyStoryApply")
    a = sample(comfy, apply.apply(flux_model, anystory, subjects)[0], meta)
    defaults = F.node(pack, "AnyStoryFluxOptions").options()[0]
    b = sample(comfy, apply.apply(flux_model, anystory, subjects, flux_options=defaults)[0], meta)
    assert torch.equal(a, b)
    d = F.pack_mod("nodes.flux.options").FluxOptions()
    assert (d.redux_scale, d.redux_start, d.redux_end, d.ref_start, d.ref_end, d.ref_shift, d.ref_mask, d.ref_cache) \
        == (0.6, 0.1, 0.3, 0.0, 1.0, 0.0, True, True)


# each option of the authors' generate() changes the image; the second override shows it does so only where theirs
# acts (an option of a window that covers no step changes nothing)
OPTION_CASES = [
    ("redux_scale", dict(redux_scale=1.2), dict(redux_start=0.5, redux_end=0.5)),
    ("redux_start", dict(redux_start=0.0), None),
    ("redux_end", dict(redux_end=0.5), None),
    ("ref_start", dict(ref_start=0.5), None),
    ("ref_end", dict(ref_end=1.0), None),
    ("ref_shift", dict(ref_shift=-1.0), dict(ref_start=0.5, ref_end=0.5)),
    ("ref_mask", dict(ref_mask=False), dict(ref_start=0.5, ref_end=0.5)),
    ("router", dict(router="off"), None),
]


def _run(pack, comfy, flux_model, anystory, redux, current, **over):
    got, routing, _, _ = run_nodes(pack, comfy, flux_model, anystory, redux, current, "case_2s_router1_cache1", **over)
    return got


@pytest.mark.parametrize("option,change,where", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_each_option_reaches_the_patch(pack, comfy, flux_model, anystory, redux, golden_masks, option, change, where):
    base = _run(pack, comfy, flux_model, anystory, redux, golden_masks)
    changed = _run(pack, comfy, flux_model, anystory, redux, golden_masks, **change)
    assert (changed - base).abs().max().item() > 1e-3, f"{option} did not change the image"
    if where is not None:
        a = _run(pack, comfy, flux_model, anystory, redux, golden_masks, **where)
        b = _run(pack, comfy, flux_model, anystory, redux, golden_masks, **{**where, **change})
        assert torch.equal(a, b), f"{option} acted outside its window"


def test_ref_cache_changes_speed_not_the_image(pack, comfy, flux_model, anystory, redux, golden_masks, monkeypatch):
    patch_mod = F.pack_mod("nodes.flux.patch")
    calls = []
    real = patch_mod.reference_kv
    monkeypatch.setattr(patch_mod, "reference_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = _run(pack, comfy, flux_model, anystory, redux, golden_masks)
    n_cached = len(calls)
    fresh = _run(pack, comfy, flux_model, anystory, redux, golden_masks, ref_cache=False)
    assert n_cached == 1 and len(calls) - n_cached == 3  # once per run vs every reference step (0, 1, 2)
    assert (cached - fresh).abs().max().item() < 1e-5


def test_apply_strengths_map_onto_the_flux_settings(pack, comfy, flux_model, anystory, redux, golden_masks):
    """η multiplies redux_scale, γ adds ln γ to ref_shift; 0 switches each off."""
    import math
    base = _run(pack, comfy, flux_model, anystory, redux, golden_masks)
    eta = _run(pack, comfy, flux_model, anystory, redux, golden_masks, redux_scale=0.3, apply_kw=dict(eta=2.0))
    assert torch.equal(base, eta)
    gamma = _run(pack, comfy, flux_model, anystory, redux, golden_masks, ref_shift=0.0,
                 apply_kw=dict(gamma=math.exp(0.5)))
    assert (base - gamma).abs().max().item() < 1e-5
    no_ref = _run(pack, comfy, flux_model, anystory, redux, golden_masks, apply_kw=dict(gamma=0.0))
    window = _run(pack, comfy, flux_model, anystory, redux, golden_masks, ref_start=0.9, ref_end=0.9)
    assert torch.equal(no_ref, window)


def test_unsupported_settings_are_refused(pack, flux_model, anystory, redux, golden_masks):
    subjects = encode_subjects(pack, anystory, redux, golden_masks, 2)
    apply = F.node(pack, "AnyStoryApply")
    for mode in ("attention", "masks", "mixed"):
        F.raises_pack_error(lambda: apply.apply(flux_model, anystory, subjects, router_mode=mode), mode, "FLUX")
    F.raises_pack_error(lambda: apply.apply(flux_model, anystory, subjects, region_masks=torch.ones(2, 8, 8)),
                        "region_masks", "FLUX")
    off = F.node(pack, "AnyStoryFluxOptions").options(router="off")[0]
    F.raises_pack_error(lambda: apply.apply(flux_model, anystory, subjects, router_mode="router", flux_options=off),
                        "router")
    F.raises_pack_error(lambda: F.node(pack, "AnyStoryFluxOptions").options(ref_start=0.8, ref_end=0.2),
                        "ref_start")
    patched, _ = apply.apply(flux_model, anystory, subjects)
    F.raises_pack_error(lambda: apply.apply(patched, anystory, subjects), "one per MODEL")


def test_sdxl_ignores_flux_options_with_a_warning(pack, harness, temp_dir, caplog):
    env = F.build_env(harness, pack)
    opts = F.node(pack, "AnyStoryFluxOptions").options(redux_scale=2.0)[0]
    apply = F.node(pack, "AnyStoryApply")
    with caplog.at_level(logging.WARNING, logger="anystory"):
        with_opts, _ = apply.apply(env.model, env.am, env.subjects, "masks", region_masks=env.masks,
                                   flux_options=opts)
    assert "apply to FLUX models only" in caplog.text
    plain, _ = apply.apply(env.model, env.am, env.subjects, "masks", region_masks=env.masks)
    lat = torch.zeros(1, 4, 16, 16)
    assert torch.equal(env.sample(with_opts, lat), env.sample(plain, lat))


# ------------------------------------------------------------------------------------------------
# the preview, the input MODEL
# ------------------------------------------------------------------------------------------------
def test_routing_preview_of_a_flux_run(pack, comfy, flux_model, anystory, redux, golden_masks, temp_dir):
    _, routing, _, _ = run_nodes(pack, comfy, flux_model, anystory, redux, golden_masks, "case_2s_router1_cache1")
    run = routing.runs[-1]
    latent = {"samples": run.output}
    res = F.node(pack, "AnyStoryRoutingPreview").preview(routing, latent, layers="all", steps="all")
    grid, masks = res["result"]
    assert grid.ndim == 4 and grid.shape[-1] == 3 and grid.shape[1] > 4 * 96
    assert masks.shape == (2, 128, 128) and float(masks.sum(0).min()) > 0.99  # no background route on FLUX
    names = [F.pack_mod("nodes.preview")._layer_name(k) for k in run.layer_order]
    assert names == ["dbl0", "dbl1", "sgl0", "sgl1"]
    auto = F.pack_mod("anystory.preview").default_layers(run.layer_order)
    assert auto == run.layer_order  # 4 blocks: all of them (≤ 12 rows)
    one = F.node(pack, "AnyStoryRoutingPreview").preview(routing, latent)["result"][1]
    assert one.shape == (2, 128, 128)


def test_input_model_is_not_changed(pack, comfy, flux_model, anystory, redux, golden_masks):
    before = repr(flux_model.model_options), dict(flux_model.wrappers)
    sd = {k: v.clone() for k, v in flux_model.model.diffusion_model.state_dict().items()}
    run_nodes(pack, comfy, flux_model, anystory, redux, golden_masks, "case_2s_router1_cache0")
    assert (repr(flux_model.model_options), dict(flux_model.wrappers)) == before
    assert "patches_replace" not in flux_model.model_options.get("transformer_options", {})
    now = flux_model.model.diffusion_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in sd.items())


def test_comfyui_siglip_is_the_authors_encoder(comfy, tmp_path):
    """The CLIP_VISION the FLUX encode node reads (ComfyUI's SigLIP, ``last_hidden_state``) computes what the
    authors' encoder gives (transformers' SiglipVisionModel ``last_hidden_state``), on the same random weights and
    pixels (a tiny SigLIP of ComfyUI's siglip_vision_model kind)."""
    import json

    transformers = pytest.importorskip("transformers")
    import comfy.clip_vision
    cfg = {"num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 32, "image_size": 384,
           "intermediate_size": 64, "model_type": "siglip_vision_model", "num_attention_heads": 2,
           "num_hidden_layers": 2, "patch_size": 14, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (tmp_path / "siglip.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=384,
        patch_size=14)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cv = comfy.clip_vision.ClipVisionModel(str(tmp_path / "siglip.json"))
    sd = {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v.clone()  # transformers 5 drops the prefix
          for k, v in hf.state_dict().items()}
    missing, _ = cv.load_sd(sd)
    assert not missing, missing
    image = torch.rand(1, 384, 384, 3, generator=torch.Generator().manual_seed(1))
    ours = cv.encode_image(image, crop=False)["last_hidden_state"].float()
    pixels = (torch.round(image * 255) / 255 - 0.5) / 0.5  # ComfyUI quantises to 8 bits as an image file would be
    with torch.no_grad():
        theirs = hf(pixel_values=pixels.permute(0, 3, 1, 2)).last_hidden_state
    assert ours.shape == theirs.shape == (1, 729, 32)
    assert (ours - theirs).abs().max().item() < 2e-3 * theirs.abs().max().item(), (ours - theirs).abs().max()


def test_live_routing_map_of_a_flux_run(pack, comfy, flux_model, anystory, redux, golden_masks):
    """The live preview's per-step vote (nodes/live.py) reads FLUX records as it reads SDXL ones."""
    _, meta = ff.case("case_2s_router1_cache1")
    subjects = encode_subjects(pack, anystory, redux, golden_masks, 2)
    opts = golden_options(pack, meta)
    patched, routing = F.node(pack, "AnyStoryApply").apply(flux_model, anystory, subjects, flux_options=opts)
    seen = []
    routing.listeners.append(lambda rec, run, step: seen.append(step))
    sample(comfy, patched, meta)
    assert seen == [0, 1, 2]
    live = F.pack_mod("nodes.live")
    index, masked = live.step_map(routing.runs[-1].steps[2], 2)
    assert index.shape == (8, 8) and set(index.unique().tolist()) <= {0, 1} and not bool(masked.any())
    assert live.render_png(index, masked, 2)[:4] == b"\x89PNG"


def test_negative_prompt_rows_are_plain_flux(pack, comfy, flux_model, anystory, redux, golden_masks):
    """With cfg > 1 the negative prompt's rows (batched with the positive ones) see no subject: they are plain
    FLUX, while the positive rows get AnyStory."""
    golden, meta = ff.case("case_2s_router1_cache0")
    subjects = encode_subjects(pack, anystory, redux, golden_masks, 2)
    patched, _ = F.node(pack, "AnyStoryApply").apply(flux_model, anystory, subjects,
                                                      flux_options=golden_options(pack, meta))
    inp = ff.inputs()
    x = ff.unpack(ff.step_latents(inp, golden, 4)[1], 16, 16).expand(2, -1, -1, -1)
    sigma = (inp["timesteps"][1] / 1000).reshape(1).expand(2)
    ctx = torch.cat([inp["prompt_embeds"], inp["prompt_embeds"].flip(1)])
    y = torch.cat([inp["pooled"], inp["pooled"].flip(1)])

    def call(model, rows=2):
        to = dict(model.model_options["transformer_options"])
        to.update(wrappers=model.wrappers, sigmas=sigma[:rows], sample_sigmas=inp["sigmas"],
                  cond_or_uncond=[0, 1][:rows])
        with torch.no_grad():
            return model.model.diffusion_model(x[:rows], sigma[:rows], ctx[:rows], y=y[:rows],
                                               guidance=torch.tensor([3.5, 3.5])[:rows], transformer_options=to)

    ours, plain = call(patched), call(flux_model)
    assert (ours[1] - plain[1]).abs().max().item() < 1e-5          # the negative row: plain FLUX
    assert (ours[0] - plain[0]).abs().max().item() > 1e-2          # the positive row: AnyStory acted
    alone = call(patched, rows=1)                                   # ... as it does without the negative row
    assert (ours[0] - alone[0]).abs().max().item() < 1e-5


def test_flux_encode_warns_like_sdxl_when_the_background_would_be_encoded(pack, anystory, redux, golden_masks):
    """Issue 18 point 3: the FLUX family's encode shows the same mask warnings on the node (ui 'warnings')."""
    enc = F.node(pack, "AnyStorySubjectEncode")
    img, mask = _image(0)
    res = enc.encode(anystory, GoldenSiglip(0, golden_masks), GoldenVAE(0), img, label="s0", style_model=redux)
    assert any("no subject mask" in w and "RMBG" in w for w in res["ui"]["warnings"]), res["ui"]["warnings"]
    res = enc.encode(anystory, GoldenSiglip(0, golden_masks), GoldenVAE(0), img, mask=mask, label="s0",
                     style_model=redux)
    assert not any("mask" in w for w in res["ui"]["warnings"]), res["ui"]["warnings"]
