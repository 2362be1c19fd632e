"""AnyStorySubjectEncode in-process with REAL ComfyUI (issue #3): the subject mask convention (white =
subject, any size, alpha fallback, all-black = whole image with a visible warning), several images =
several views of one subject (tokens pooled, reference tokens concatenated), label/strength stored
and used, chained subjects in order, the 9-subject limit, CLIP width and wiring refusals.

Stand-ins with ComfyUI's interfaces for CLIP vision and the VAE; the tiny SDXL-family MODEL is the
shared ReferenceNet.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from comfy_harness import load_module  # registered by tests/nodes/conftest.py

F = load_module("anystory_fixtures", Path(__file__).with_name("anystory_fixtures.py"))
temp_dir = F.temp_dir


@pytest.fixture(scope="module")
def env(harness, pack, temp_dir):
    return F.build_env(harness, pack, with_subjects=False)


def _err(pack):
    return F.pack_mod("nodes.types").AnyStoryError


RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


def _two_colour_image(h=64, w=96):
    """[1, H, W, 3]: left half red, right half blue."""
    import torch
    img = torch.zeros(1, h, w, 3)
    img[:, :, : w // 2] = torch.tensor(RED)
    img[:, :, w // 2:] = torch.tensor(BLUE)
    return img


def _subject_views(seen):
    """The images a CLIP stand-in was given, less the background route's zero image (either convention)."""
    import torch
    enc = F.pack_mod("anystory.paper.encoder")
    blanks = [enc.zero_image_rgb(z) for z in enc.ZERO_IMAGES]
    return [im for im in seen if not any(im.shape == b.shape and torch.equal(im, b) for b in blanks)]


def _colours(img):
    """(red pixels, blue pixels, neutral-fill pixels) of [.., H, W, 3]."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    red = int(((r > 0.7) & (b < 0.3)).sum())
    blue = int(((b > 0.7) & (r < 0.3)).sum())
    fill = int((((img - 0.5).abs() < 0.02).all(-1)).sum())
    return red, blue, fill


# ------------------------------------------------------------------------------------------------
# mask conventions
# ------------------------------------------------------------------------------------------------
def test_mask_white_is_subject_any_size(env):
    import torch

    img = _two_colour_image()
    mask = torch.zeros(1, 32, 48)       # another size than the image: resized
    mask[:, :, :24] = 1                 # white on the RED half = the subject
    res = env.encode(img, mask=mask, reference="off")
    subject, crop = res["result"]
    assert crop.shape == (1, 512, 512, 3) and 0 <= float(crop.min()) and float(crop.max()) <= 1
    red, blue, fill = _colours(crop)
    assert red > 0.2 * 512 * 512 and blue < 0.01 * 512 * 512 and fill > 0.2 * 512 * 512, (red, blue, fill)
    seen = _subject_views(env.clip.seen)[-1]  # what CLIP encoded (not the zero image)
    assert seen.shape == (1, 224, 224, 3)
    red, blue, _ = _colours(seen)
    assert red > 0.2 * 224 * 224 and blue < 0.01 * 224 * 224
    assert res["ui"]["anystory_subject"][0]["warnings"] == []

    # the inverted mask (e.g. LoadImage's MASK without InvertMask) selects the other half
    crop_inv = env.encode(img, mask=1 - mask, reference="off")["result"][1]
    red, blue, _ = _colours(crop_inv)
    assert blue > 0.2 * 512 * 512 and red < 0.01 * 512 * 512, (red, blue)


def test_all_black_mask_means_whole_image_with_warning(env, caplog):
    import torch

    img = _two_colour_image()
    with caplog.at_level(logging.WARNING):
        res = env.encode(img, mask=torch.zeros(1, 64, 64), label="blob", reference="off")  # LoadImage, no alpha
    subject, crop = res["result"]
    red, blue, _ = _colours(crop)
    assert red > 0.1 * 512 * 512 and blue > 0.1 * 512 * 512, "an all-black mask did not mean the whole image"
    warnings = res["ui"]["anystory_subject"][0]["warnings"]
    assert warnings and "empty" in warnings[0] and "InvertMask" in warnings[0]
    assert subject.subjects[0].warnings == warnings
    assert any("InvertMask" in r.getMessage() and "blob" in r.getMessage() for r in caplog.records)


def _centre_mask(h=64, w=96):
    import torch
    m = torch.zeros(1, h, w)
    m[:, 16:48, 24:72] = 1  # a subject in the middle: 25 % of the image
    return m


@pytest.mark.parametrize("case,needle", [("no mask", "no subject mask"), ("all white", "all white"),
                                         ("covers most", "of the image: most of the background"), ("inverted", "inverted")])
def test_no_usable_mask_warns_on_the_node(env, case, needle):
    """Issue 18 points 3-4: a subject whose background would be encoded warns, as text the node shows
    (ui 'warnings', drawn by web/anystory.js and kept in /history) naming the fixes."""
    import torch
    img = _two_colour_image()
    mask = {"no mask": None, "all white": torch.ones(1, 64, 64),  # a JPEG through LoadImage → InvertMask
            "covers most": torch.ones(1, 100, 100), "inverted": 1 - _centre_mask()}[case]
    if case == "covers most":
        mask[:, :4] = 0
        mask[:, :, :4] = 0  # 96 × 96 of 100 × 100: over 90 %
    res = env.encode(img, mask=mask, reference="off")
    warnings = res["ui"]["warnings"]
    assert len(warnings) == 1 and needle in warnings[0], warnings
    assert "InvertMask" in warnings[0]
    if case != "inverted":
        assert all(w in warnings[0] for w in ("RMBG", "Rembg", "Segment Anything")), warnings[0]
    assert res["ui"]["anystory_subject"][0]["warnings"] == warnings
    assert res["result"][0].subjects[0].warnings == warnings


def test_good_alpha_or_mask_gives_no_warning(env):
    import torch
    img = _two_colour_image()
    assert env.encode(img, mask=_centre_mask(), reference="off")["ui"]["warnings"] == []
    rgba = torch.cat([img, _centre_mask()[..., None]], -1)  # an IMAGE with alpha (e.g. from a rembg node)
    assert env.encode(rgba, reference="off")["ui"]["warnings"] == []


def test_alpha_channel_is_the_mask_when_none_given(env):
    import torch

    img = torch.cat([_two_colour_image(), torch.zeros(1, 64, 96, 1)], -1)
    img[..., 48:, 3] = 1  # opaque = the blue half
    crop = env.encode(img, reference="off")["result"][1]
    red, blue, _ = _colours(crop)
    assert blue > 0.2 * 512 * 512 and red == 0


# ------------------------------------------------------------------------------------------------
# several images = several views of one subject
# ------------------------------------------------------------------------------------------------
def test_image_batch_is_views_of_one_subject(env):
    import torch

    a = F.subject_image((0.9, 0.2, 0.1), (64, 64), seed=1)
    b = F.subject_image((0.2, 0.8, 0.3), (64, 64), seed=2)
    one = env.encode(a)["result"][0].subjects[0]
    n_before = len(env.clip.seen)
    both = env.encode(torch.cat([a, b]))["result"][0]
    views = _subject_views(env.clip.seen[n_before:])
    assert len(views) == 1, "the views were not encoded in one CLIP call"
    views = views[0]
    assert len(both) == 1, "two views made two subjects"
    s = both.subjects[0]
    assert s.E.shape == one.E.shape == (F.TINY_TOKENS, F.CTX)
    # tokens pooled: E = QFormer(mean of the two views' CLIP features)
    assert views.shape == (2, 224, 224, 3)
    feats = env.clip.encode_image(views).penultimate_hidden_states
    blank = F.pack_mod("anystory.paper.encoder").zero_image_rgb()  # the stand-in's zero image: mean grey
    zero = env.clip.encode_image(blank).penultimate_hidden_states
    emb = env.am.adapter.encode(feats.mean(0, keepdim=True), zero)
    torch.testing.assert_close(s.E, emb.E[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both.E_bg, emb.E[1], rtol=1e-5, atol=1e-6)
    swapped = env.encode(torch.cat([b, a]))["result"][0].subjects[0]
    torch.testing.assert_close(swapped.E, s.E, rtol=1e-5, atol=1e-6)  # order of views does not matter
    assert (s.E - one.E).abs().max() > 1e-4
    # references concatenated: twice the tokens per layer, the first view's tokens first
    assert env.vae.seen[-1].shape[0] == 2
    for key, f in s.refs.features.items():
        f1 = one.refs.features[key]
        assert f.shape[0] == 1 and f.shape[1] == 2 * f1.shape[1], (key, f.shape, f1.shape)
        assert s.refs.valid[key].shape == (1, f.shape[1])
        torch.testing.assert_close(f[:, : f1.shape[1]], f1, rtol=1e-4, atol=1e-5)
        assert s.refs.subject_tokens(key, 0).shape[0] >= one.refs.subject_tokens(key, 0).shape[0]
    assert set(s.refs.features) == set(F.TINY_KEYS)


# ------------------------------------------------------------------------------------------------
# label, strength, chaining
# ------------------------------------------------------------------------------------------------
def test_label_strength_and_chain_order(env):
    import torch

    enc = lambda **kw: env.encode(F.subject_image(seed=len(kw)), reference="off", **kw)  # noqa: E731
    r1 = enc(label="  the red car ", strength=0.7)
    r2 = env.encode(F.subject_image((0.1, 0.9, 0.1), seed=3), subjects=r1["result"][0], label="the man",
                    reference="off")
    r3 = env.encode(F.subject_image((0.1, 0.1, 0.9), seed=4), subjects=r2["result"][0], reference="off")
    s1, s2, s3 = r1["result"][0], r2["result"][0], r3["result"][0]
    assert [len(s1), len(s2), len(s3)] == [1, 2, 3]
    assert s3.labels == ["the red car", "the man", "subject 3"]
    assert [s.strength for s in s3.subjects] == [0.7, 1.0, 1.0]
    assert s3.subjects[0] is s1.subjects[0] and s3.subjects[1] is s2.subjects[1]  # appended in order
    assert torch.equal(s3.E_bg, s1.E_bg)
    assert len(s1) == 1 and len(s2) == 2  # chaining does not modify the upstream value
    palette = F.pack_mod("anystory.preview").PALETTE_HEX
    for i, r in enumerate((r1, r2, r3)):
        info = r["ui"]["anystory_subject"][0]
        assert info["index"] == i and info["color"] == palette[i]
    assert r1["ui"]["anystory_subject"][0]["label"] == "the red car"
    # strength multiplies η (and γ) of that subject in AnyStoryApply; the background route gets η
    masks = torch.zeros(3, 32, 32)
    masks[0, :, :10], masks[1, :, 10:20], masks[2, :, 20:] = 1, 1, 1
    patched, routing = env.apply(subjects=s3, eta=0.8, gamma=0.5, region_masks=masks)
    rt = F.owner_of(patched).runtime
    torch.testing.assert_close(rt.inputs.eta, torch.tensor([0.56, 0.8, 0.8, 0.8]))
    assert routing.labels == ["the red car", "the man", "subject 3"]
    assert torch.equal(rt.inputs.E[0], s1.subjects[0].E.float()) and torch.equal(rt.inputs.E[-1], s1.E_bg.float())


def test_ninth_subject_refused(env, pack):
    subjects = None
    for i in range(8):
        subjects = env.encode(F.subject_image(seed=i), subjects=subjects, reference="off")["result"][0]
    assert len(subjects) == 8
    with pytest.raises(_err(pack)) as ei:
        env.encode(F.subject_image(seed=9), subjects=subjects, reference="off")
    assert "at most 8" in str(ei.value) and "8" in str(ei.value)


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
def test_clip_width_mismatch_refused(env, pack):
    vit_l = F.FakeClipVision(width=1024)
    with pytest.raises(_err(pack)) as ei:
        env.encode(F.subject_image(), clip=vit_l, reference="off")
    msg = str(ei.value)
    assert "1024" in msg and "CLIP ViT-L/14" in msg and "CLIP ViT-H/14" in msg and "CLIP-ViT-H-14" in msg, msg


def test_wiring_refusals(env, harness, pack):
    import torch

    err = _err(pack)
    with pytest.raises(err, match="reference='native' needs a ReferenceNet"):
        env.encode(F.subject_image(), reference="native")
    with pytest.raises(err, match="connect the MODEL input"):
        env.encode(F.subject_image(), reference="shared", model=None)
    with pytest.raises(err, match="SDXL"):
        env.encode(F.subject_image(), reference="shared", model=harness.tiny_sd15())
    other = F.make_anystory(env.layout, seed=3, name="other-file")
    first = env.encode(F.subject_image(), reference="off")["result"][0]
    with pytest.raises(err, match="another AnyStory model"):
        env.encode(F.subject_image(), am=other, subjects=first, reference="off")
    with pytest.raises(err, match="must come from AnyStoryModelLoader"):
        env.encode(F.subject_image(), am=object(), reference="off")
    bad = F.subject_image()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(err, match="NaN"):
        env.encode(bad, reference="off")
    with pytest.raises(err, match="mask"):
        env.encode(torch.rand(2, 32, 32, 3), mask=torch.ones(3, 32, 32), reference="off")


def test_reference_auto_mode(env):
    with_model = env.encode(F.subject_image())
    without = env.encode(F.subject_image(), model=None)
    assert with_model["result"][0].subjects[0].refs.source == "shared"
    assert with_model["ui"]["anystory_subject"][0]["reference"] == "shared"
    assert without["result"][0].subjects[0].refs is None
    assert without["ui"]["anystory_subject"][0]["reference"] == "off"
    # the preview image of the crop is written to ComfyUI's temp folder
    import folder_paths
    img = with_model["ui"]["images"][0]
    assert img["type"] == "temp" and (Path(folder_paths.get_temp_directory()) / img["filename"]).is_file()


def test_reference_capture_stops_after_the_last_self_attention(env):
    """The shared ReferenceNet pass keeps every layer's norm1 output exactly as a full UNet pass gives
    it, and does not run what follows the last self-attention layer (the output conv)."""
    import torch
    refnet = F.pack_mod("nodes.refnet")
    unet = env.model.model.diffusion_model
    x = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    calls = []
    hook = unet.out.register_forward_hook(lambda *a: calls.append(1))
    try:
        feats, grids = refnet.capture_features(unet, x, torch.float32, "cpu", shared=True)
    finally:
        hook.remove()
    assert calls == []

    full = {}

    def grab(n, context, value, extra_options):
        b = extra_options["block"]
        full[(b[0], b[1], extra_options.get("block_index", 0))] = n.detach().clone()
        return n, context, value

    zero = {k: (lambda q, k_, v, eo: torch.zeros_like(q)) for k in [s.key for s in env.layout]}
    to = {"patches": {"attn1_patch": [grab], "attn2_output_patch": [lambda n, eo: torch.zeros_like(n)]},
          "patches_replace": {"attn2": zero}}
    ctx_dim = next(m.attn2.to_k.weight.shape[1] for m in unet.modules() if getattr(m, "attn2", None) is not None)
    kw = {"y": torch.zeros(1, unet.label_emb[0][0].in_features)} if getattr(unet, "num_classes", None) else {}
    with torch.no_grad():
        out = unet(x, timesteps=torch.zeros(1), context=torch.zeros(1, 1, ctx_dim), transformer_options=to, **kw)
    assert out.shape == x.shape
    assert set(feats) == set(full) and len(feats) == len(env.layout)
    for k in full:
        assert torch.equal(feats[k], full[k]), k
        assert grids[k][0] * grids[k][1] == full[k].shape[1]


def test_reference_features_leave_the_gpu_in_one_transfer(env):
    """G_i^l is stored on ComfyUI's intermediate device; all layers move in one transfer, each layer a
    view of it with its own shape and values."""
    import torch
    refnet = F.pack_mod("nodes.refnet")
    g = torch.Generator().manual_seed(3)
    feats = {("input", 4, 0): torch.randn(1, 6, 8, generator=g), ("middle", 0, 0): torch.randn(1, 2, 16, generator=g)}
    assert refnet._to_device(feats, "cpu") is feats  # already there: nothing copied
    moved = refnet._to_device(feats, "meta")
    assert {k: (t.device.type, t.shape) for k, t in moved.items()} == {k: ("meta", t.shape) for k, t in feats.items()}
    bases = [t._base for t in moved.values()]
    assert all(b is not None and b is bases[0] for b in bases)  # views of one tensor: one allocation, one copy
    back = refnet._to_device({k: t.double() for k, t in feats.items()}, torch.device("cpu"))
    for k in feats:
        assert torch.equal(back[k], feats[k].double())
    import comfy.model_management as mm
    subjects = env.encode(F.subject_image())["result"][0]
    refs = subjects.subjects[0].refs
    assert all(f.device == mm.intermediate_device() for f in refs.features.values())


def comfy_clip_vision(device: str, dtype, width: int = 64, layers: int = 3, seed: int = 0):
    """ComfyUI's own ClipVisionModel class and methods (a small config of CLIP-H: ``width`` wide, ``layers``
    deep, 224 px, patch 14 → 257 tokens) with random weights, built on ``device`` without the CLI's --cpu."""
    import json

    import torch

    import comfy.clip_model
    import comfy.clip_vision
    import comfy.model_patcher
    import comfy.ops
    cfg = json.loads((Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json").read_text())
    cfg.update(num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width,
               num_attention_heads=4, projection_dim=32)

    class Vision(comfy.clip_vision.ClipVisionModel):
        def __init__(self):
            self.image_size = 224
            self.image_mean, self.image_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
            self.return_all_hidden_states = False
            self.load_device = torch.device(device)
            self.dtype = dtype
            self.model = comfy.clip_model.CLIPVisionModelProjection(cfg, dtype, device, comfy.ops.manual_cast)
            self.patcher = comfy.model_patcher.ModelPatcher(self.model, load_device=self.load_device,
                                                            offload_device=self.load_device)

    torch.manual_seed(seed)
    cv = Vision()
    cv.model.to(device)  # as ComfyUI's load_model_gpu does (some layers are built on the CPU)
    with torch.no_grad():
        for p in cv.model.parameters():
            p.normal_(0, 0.05)
    return cv


# ------------------------------------------------------------------------------------------------
# the background route's zero image (issue 19 item 1)
# ------------------------------------------------------------------------------------------------
def test_background_route_is_clip_of_the_normalised_zero_image(env, monkeypatch):
    """E_{N+1}, R_{N+1} (and CFG's unconditional image tokens) come from CLIP of zeros of the ALREADY-NORMALISED
    input, as IP-Adapter and UniPortrait make them (``image_encoder(torch.zeros_like(clip_image))``), not from a
    black image through ComfyUI's normalisation (≈ −1.79, −1.75, −1.48: the old path, ComfyUI_IPAdapter_plus's),
    which stays available as blank_image = black pixels; "as trained" follows the model file."""
    import torch
    enc = F.pack_mod("nodes.clip")
    sdxl = F.pack_mod("nodes.sdxl")
    F.pack_mod("nodes.state").BACKGROUND_FEATURES.clear()
    cv = comfy_clip_vision("cpu", torch.float32, width=F.CLIP_H, layers=2)  # ComfyUI's real class, CLIP-H wide
    with torch.no_grad():
        zeros = cv.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)[1]
        old = cv.encode_image(torch.zeros(1, 224, 224, 3), crop=False)["penultimate_hidden_states"]
    assert torch.equal(enc.background_features(cv), zeros)
    assert (zeros - old).abs().max() > 0.05                                  # the two conventions differ
    assert torch.equal(enc.background_features(cv, "pixel_black"), old)     # bit for bit the old path
    assert len(F.pack_mod("nodes.state").BACKGROUND_FEATURES) == 2           # one entry per convention

    img = F.subject_image(seed=5)
    ad = env.am.adapter
    res = env.encode(img, clip=cv, reference="off")["result"][0]
    feats = cv.encode_image(F.pack_mod("anystory.prepare").prepare_subject(img).clip_image,
                            crop=False)["penultimate_hidden_states"]
    want = ad.encode(feats, zeros)
    torch.testing.assert_close(res.E_bg, want.E[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.R_bg, want.R[1], rtol=1e-5, atol=1e-6)
    assert res.subjects[0].zero_image == "normalized_zeros"
    black = env.encode(img, clip=cv, reference="off", blank_image="black pixels (IPAdapter_plus)")["result"][0]
    torch.testing.assert_close(black.E_bg, ad.encode(feats, old).E[1], rtol=1e-5, atol=1e-6)
    assert (black.E_bg - res.E_bg).abs().max() > 1e-3
    torch.testing.assert_close(black.subjects[0].E, res.subjects[0].E)       # the subject's own tokens: unchanged
    monkeypatch.setitem(ad.meta, "zero_image", "pixel_black")               # a native file trained with black
    as_trained = env.encode(img, clip=cv, reference="off")["result"][0]
    assert torch.equal(as_trained.E_bg, black.E_bg) and as_trained.subjects[0].zero_image == "pixel_black"
    forced = env.encode(img, clip=cv, reference="off", blank_image="zeros after normalisation (IP-Adapter)")
    assert torch.equal(forced["result"][0].E_bg, res.E_bg)
    # a chain whose encodes disagree: the first one's background route, a warning on the node
    two = env.encode(F.subject_image(seed=6), clip=cv, reference="off", subjects=forced["result"][0])
    assert torch.equal(two["result"][0].E_bg, res.E_bg)
    assert any("blank_image differs" in w for w in two["ui"]["anystory_subject"][0]["warnings"])
    assert list(sdxl.BLANK_IMAGES) == ["as trained (model file)", "zeros after normalisation (IP-Adapter)",
                                       "black pixels (IPAdapter_plus)"]
    with pytest.raises(_err(env.pack), match="blank_image"):
        env.encode(img, clip=cv, reference="off", blank_image="grey")


# ------------------------------------------------------------------------------------------------
# the ReferenceNet pass's vector conditioning (issue 19 item 5)
# ------------------------------------------------------------------------------------------------
def test_reference_pass_gets_the_prompt_pooled_output_and_the_reference_size(env):
    """The ReferenceNet's y is SDXL's: [the positive prompt's pooled output, size embeddings of the 512²
    reference] exactly as ComfyUI's SDXL model builds it (comfy.model_base.SDXL.encode_adm), not zeros;
    without a conditioning the pooled part is zero and the size part stays; the features depend on it."""
    import torch
    unet = env.model.model.diffusion_model
    seen = []
    hook = unet.label_emb.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().float().clone()))
    img = F.subject_image(seed=7)
    pooled = env.pos[0][1]["pooled_output"]
    try:
        a = env.encode(img, reference="shared", conditioning=env.pos)["result"][0].subjects[0]
        b = env.encode(img, reference="shared")["result"][0].subjects[0]
        c = env.encode(img, reference="shared", conditioning=env.neg)["result"][0].subjects[0]
    finally:
        hook.remove()
    assert len(seen) == 3
    want = env.model.model.encode_adm(pooled_output=pooled, width=512, height=512)  # ComfyUI's y, 512² latent
    torch.testing.assert_close(seen[0], want.float(), rtol=1e-6, atol=1e-6)
    assert seen[0][:, :1280].abs().max() > 0.1
    assert torch.equal(seen[1][:, :1280], torch.zeros_like(seen[1][:, :1280]))  # no conditioning: zero pooled …
    torch.testing.assert_close(seen[1][:, 1280:], want[:, 1280:].float())      # … and the reference's size
    ref = F.pack_mod("anystory.paper.reference")
    torch.testing.assert_close(ref.reference_y(pooled, (512, 512)), want.float(), rtol=1e-6, atol=1e-6)
    key = next(iter(a.refs.features))
    assert (a.refs.features[key] - b.refs.features[key]).abs().max() > 1e-4
    assert (a.refs.features[key] - c.refs.features[key]).abs().max() > 1e-4
    with pytest.raises(_err(env.pack), match="pooled output"):
        env.encode(img, reference="shared", conditioning=env.harness.tiny_cond(ctx=F.CTX, pooled=False))
    with pytest.raises(_err(env.pack), match="CONDITIONING"):
        env.encode(img, reference="shared", conditioning="a prompt")


needs_cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()",
                                reason="NO CUDA DEVICE: the encoders' CUDA graphs are only checked on a GPU machine "
                                       "(run this file there)")


@needs_cuda
def test_reference_pass_through_a_cuda_graph_gives_the_eager_features(env):
    """The ReferenceNet pass replayed from its CUDA graph (kept across encodes) gives capture_features'
    eager output for every new subject, and is captured anew when the weights move."""
    import copy

    import torch
    refnet = F.pack_mod("nodes.refnet")
    graphs = F.pack_mod("anystory.fast.graphs").ForwardGraphs(enabled=True, min_vram_gb=0)
    unet = copy.deepcopy(env.model.model.diffusion_model).cuda()
    state = F.pack_mod("nodes.state")
    orig = state.ENCODER_GRAPHS
    state.ENCODER_GRAPHS = graphs
    try:
        with torch.inference_mode():
            for i in range(4):
                x = torch.randn(2, 4, 16, 24, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
                y = torch.randn(2, unet.label_emb[0][0].in_features, device="cuda")  # a new prompt each time
                got, grids = refnet.reference_pass(unet, x, torch.float32, shared=True, y=y)
                got = refnet._to_device(got, "cuda", copy=True)  # as reference_features does
                want, want_grids = refnet.capture_features(unet, x, torch.float32, x.device, shared=True, y=y)
                assert grids == want_grids and set(got) == set(want)
                for k in want:
                    torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-4)
                    assert got[k].data_ptr() != want[k].data_ptr()
            assert graphs.stats == {"eager": 1, "capture": 1, "replay": 2}
            unet.cpu().cuda()
            got, _ = refnet.reference_pass(unet, x, torch.float32, shared=True, y=y)
            for k in want:
                torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-4)
            assert graphs.stats["capture"] == 2
    finally:
        state.ENCODER_GRAPHS = orig


@needs_cuda
def test_clip_vision_through_a_cuda_graph_gives_encode_image(comfy, monkeypatch):
    """ComfyUI's CLIP vision model (a small config of the real class) through the graphed path equals its
    own encode_image, subject after subject; the background route's zero image goes through the same graph."""
    import torch

    import comfy.clip_vision
    import comfy.model_management as mm
    enc = F.pack_mod("nodes.clip")
    state = F.pack_mod("nodes.state")
    cv = comfy_clip_vision("cuda", torch.float16, width=64, layers=3)
    monkeypatch.setattr(mm, "load_model_gpu", lambda patcher: None)
    monkeypatch.setattr(state, "ENCODER_GRAPHS", F.pack_mod("anystory.fast.graphs").ForwardGraphs(enabled=True, min_vram_gb=0))
    with torch.inference_mode():
        for i in range(4):
            img = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(i))
            got = enc.clip_features(cv, img)
            assert got.dtype == torch.float32 and got.device.type == "cuda"
            want = cv.encode_image(img, crop=False)["penultimate_hidden_states"]  # fp32 compute
            torch.testing.assert_close(got.cpu(), want, atol=5e-3, rtol=5e-3)  # fp16 compute
            px = comfy.clip_vision.clip_preprocess(img.cuda(), crop=False).half()
            torch.testing.assert_close(got, cv.model(pixel_values=px, intermediate_output=-2)[1].float(),
                                       atol=1e-3, rtol=1e-3)  # graph vs eager kernels
        assert state.ENCODER_GRAPHS.stats == {"eager": 1, "capture": 1, "replay": 2}
        zeros = torch.zeros(1, 3, 224, 224, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(enc.zero_image_features(cv), cv.model(pixel_values=zeros, intermediate_output=-2)[1]
                                   .float(), atol=1e-3, rtol=1e-3)  # the normalised zeros, through the graph
        monkeypatch.setenv("ANYSTORY_CLIP_FP32", "1")
        got = enc.clip_features(cv, img)  # fp32 compute, as encode_image (another input dtype: captured anew)
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
        black = cv.encode_image(torch.zeros(1, 224, 224, 3), crop=False)["penultimate_hidden_states"]
        torch.testing.assert_close(enc.zero_image_features(cv, "pixel_black").cpu(), black, atol=1e-5, rtol=1e-5)
