"""Checkpoint loading/saving: native AnyStory SDXL, IP-Adapter Plus SDXL ViT-H (real full shapes,
.safetensors and weights-only .bin), ReferenceNet, and every refusal: one sentence that names the file,
says what it is and what to do, with the evidence (key names, shapes) in the error's ``detail`` and the
log. All files are made here; nothing is downloaded."""
from __future__ import annotations

import builtins
import logging
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from anystory.adapter import KIND_IPADAPTER_PLUS, KIND_NATIVE, AnyStoryAdapter
from anystory.checkpoint import (
    FORMAT_REFNET,
    CheckpointError,
    RefNetWeights,
    adapter_from_state_dict,
    build_refnet_state_dict,
    inspect_file,
    load_adapter,
    load_refnet,
    save_adapter,
    save_refnet,
)
from anystory.layers import LayerLayout, layout_from_state_dict, sdxl_layout
from anystory.synthetic import (
    flux_ipadapter_state_dict,
    ipadapter_faceid_state_dict,
    ipadapter_nonplus_state_dict,
    ipadapter_plus_state_dict,
    random_adapter,
    sd15_ipadapter_plus_state_dict,
    sd15_layout,
)

PREFIX = "model.diffusion_model."


# ------------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------------
def tiny_layout() -> LayerLayout:
    return LayerLayout([(("input", 4, 0), 64, 1), (("input", 4, 1), 64, 1), (("middle", 0, 0), 128, 2),
                        (("output", 3, 0), 64, 1)])


def tiny_adapter(kind=KIND_NATIVE, seed=0) -> AnyStoryAdapter:
    return random_adapter(tiny_layout(), kind=kind, num_tokens=8, router_dim=32, router_heads=2, clip_dim=32,
                          qformer_dim=64, depth=1, seed=seed)


def tiny_ipa_sd() -> dict:
    return ipadapter_plus_state_dict(tiny_layout(), num_tokens=8, clip_dim=32, qformer_dim=64, depth=1,
                                     dtype=torch.float32)


def nested(sd: dict) -> dict:
    """The official IP-Adapter .bin layout: {"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}}."""
    out: dict = {}
    for k, v in sd.items():
        top, rest = k.split(".", 1)
        out.setdefault(top, {})[rest] = v
    return out


def write(path, sd: dict, meta: dict | None = None) -> str:
    path = str(path)
    if path.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)
    else:
        torch.save(sd, path)
    return path


def refused(fn, path_or_name: str, *words: str, detail: tuple = ()) -> CheckpointError:
    """Call ``fn``; it must raise CheckpointError whose message is ONE sentence "AnyStory: cannot use '<file>'
    as <role>: it is <what> — <fix>." (then the full path once, for a file) containing each of ``words``,
    with no key names or shapes in it; each of ``detail`` (the evidence) must be in the error's ``detail``."""
    with pytest.raises(CheckpointError) as ei:
        fn()
    e = ei.value
    msg = str(e)
    base = os.path.basename(path_or_name)
    assert msg.startswith(f"AnyStory: cannot use '{base}' as "), msg
    sentence = msg
    if os.path.isabs(path_or_name):
        assert msg.count(path_or_name) == 1 and msg.endswith(f" (file: {path_or_name})"), msg  # full path once
        sentence = msg[: -len(f" (file: {path_or_name})")]
    assert sentence.endswith(".") and f"it is {e.found} — " in sentence, msg
    assert not re.search(r"[.!?]\s+[A-Z]", sentence[:-1]), f"more than one sentence: {msg}"
    rest = sentence.replace(f"'{base}'", "")
    assert "×" not in rest and not re.search(r"'[\w-]+(\.[\w*-]+)+'", rest), f"key names or shapes in: {msg}"
    for w in words:
        assert w in sentence, f"{w!r} not in: {msg}"
    for d in detail:
        assert d in e.detail, f"{d!r} not in the detail: {e.detail!r} ({msg})"
    return e


def assert_state_equal(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def full_ipa(tmp_path_factory):
    """ip-adapter-plus_sdxl_vit-h at its real shapes (424 M parameters, fp16), made once: the state
    dict, a .safetensors and an official-layout nested .bin."""
    d = tmp_path_factory.mktemp("ipa")
    sd = ipadapter_plus_state_dict(sdxl_layout())
    st = write(d / "ip-adapter-plus_sdxl_vit-h.safetensors", sd, {"format": "pt"})
    binp = write(d / "ip-adapter-plus_sdxl_vit-h.bin", nested(sd))
    return {"sd": sd, "safetensors": st, "bin": binp}


# ------------------------------------------------------------------------------------------------
# native files
# ------------------------------------------------------------------------------------------------
def test_native_round_trip_with_router(tmp_path):
    ad = tiny_adapter()
    path = tmp_path / "anystory_sdxl.safetensors"
    save_adapter(ad, path, extra_meta={"trained_steps": 123})
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    back = load_adapter(path)
    assert isinstance(back, AnyStoryAdapter)
    assert back.kind == KIND_NATIVE and back.has_router
    assert back.num_tokens == 8 and back.router_dim == 32 and back.router_heads == 2
    assert back.layer_dims == ad.layer_dims
    assert_state_equal(ad.state_dict(), back.state_dict())
    assert back.meta["format"] == "anystory-sdxl" and back.meta["version"] == "1"
    assert back.meta["subject_tokens"] == "8" and back.meta["router_dim"] == "32"
    assert back.meta["router_heads"] == "2" and back.meta["layers"] == "4"
    assert back.meta["trained_steps"] == "123" and back.meta["file"] == "anystory_sdxl.safetensors"
    back.check_layout(tiny_layout())
    # same function: E_i and R_i of random CLIP features agree
    x, bg = torch.randn(2, 5, 32), torch.randn(1, 5, 32)
    e1, e2 = ad.encode(x, bg), back.encode(x, bg)
    assert torch.equal(e1.E, e2.E) and torch.equal(e1.R, e2.R)
    assert inspect_file(path) == {"kind": "anystory-sdxl", "layers": 4, "subject_tokens": 8, "has_router": True,
                                  "reference_layers": 0, "file": "anystory_sdxl.safetensors"}
    assert back.reference_proj is None and back.reference_layers == []  # no W̃: the UNet's attn1 stands in
    assert "UNet's own attn1" in back.slots["reference projections"]


@pytest.mark.parametrize("layers", ["all", [3, 5]])
def test_native_round_trip_with_reference_projections(tmp_path, layers):
    """W̃_k^l, W̃_v^l of eq. 6-8 (reference_proj.N.to_k/to_v.weight, C×C) for all or some layers: saved,
    identified, loaded back with the same values; the metadata and inspect_file count them."""
    ad = random_adapter(tiny_layout(), num_tokens=8, router_dim=32, router_heads=2, clip_dim=32, qformer_dim=64,
                        depth=1, reference_proj=layers)
    want = sorted(ad.layer_dims) if layers == "all" else layers
    assert ad.reference_layers == want
    assert tuple(ad.state_dict()["reference_proj.5.to_k.weight"].shape) == (64, 64)
    if layers == "all":
        assert tuple(ad.state_dict()["reference_proj.7.to_k.weight"].shape) == (128, 128)  # the middle block
    path = tmp_path / "anystory_sdxl.safetensors"
    save_adapter(ad, path)
    back = load_adapter(path)
    assert back.reference_layers == want and back.meta["reference_layers"] == str(len(want))
    assert_state_equal(ad.state_dict(), back.state_dict())
    assert inspect_file(path)["reference_layers"] == len(want)
    g = torch.randn(3, 64)
    k, v = back.reference_projection(5)(g)
    torch.testing.assert_close(k, g @ ad.reference_proj["5"].to_k.weight.T)
    assert back.reference_projection(7 if layers == "all" else 1) is (None if layers != "all" else
                                                                      back.reference_proj["7"])
    assert "W̃" in back.slots["reference projections"]
    with pytest.raises(ValueError, match="native AnyStory files only"):
        random_adapter(tiny_layout(), kind=KIND_IPADAPTER_PLUS, reference_proj="all")


def test_native_load_dtype_and_heads_default(tmp_path):
    ad = tiny_adapter()
    path = write(tmp_path / "no_meta.safetensors", ad.state_dict())  # no metadata at all
    back = load_adapter(path, dtype=torch.float16)
    assert back.kind == KIND_NATIVE and back.has_router
    assert back.router_heads == 1  # router_dim // 64, at least 1, when the file does not say
    assert all(p.dtype == torch.float16 for p in back.parameters())
    for k, v in ad.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.half()), k


def test_ipadapter_derived_adapter_saves_as_native_without_router(tmp_path):
    ad = adapter_from_state_dict(tiny_ipa_sd(), name="tiny-ipa")
    assert ad.kind == KIND_IPADAPTER_PLUS and not ad.has_router
    path = tmp_path / "trained.safetensors"
    save_adapter(ad, path)
    back = load_adapter(path)
    assert back.kind == KIND_NATIVE and not back.has_router and back.routing_proj is None
    assert back.meta["derived_from"] == KIND_IPADAPTER_PLUS and back.meta["has_router"] == "0"
    assert_state_equal(ad.state_dict(), back.state_dict())
    info = inspect_file(path)
    assert info["kind"] == "anystory-sdxl" and info["has_router"] is False and info["layers"] == 4


def test_zero_image_convention_is_read_written_and_checked(tmp_path):
    """A native file says which zero image its background route was trained with (metadata ``zero_image``):
    written by save_adapter (and the router trainer), read by the loader; IP-Adapter files and files that do not
    say get IP-Adapter's zeros after normalisation, files of this pack's trainer from before it recorded it get
    black pixels (what that trainer used); an unknown value is refused with the fix."""
    ipa = adapter_from_state_dict(tiny_ipa_sd(), name="tiny-ipa")
    assert ipa.zero_image == "normalized_zeros"
    assert ipa.slots["zero image"] == "zeros after normalisation (IP-Adapter)"
    path = tmp_path / "native.safetensors"
    save_adapter(ipa, path)
    back = load_adapter(path)
    assert back.meta["zero_image"] == "normalized_zeros" and back.zero_image == "normalized_zeros"
    save_adapter(ipa, path, extra_meta={"zero_image": "pixel_black"})
    assert load_adapter(path).zero_image == "pixel_black"
    ad = tiny_adapter()
    assert load_adapter(write(tmp_path / "no_meta.safetensors", ad.state_dict())).zero_image == "normalized_zeros"
    legacy = load_adapter(write(tmp_path / "legacy.safetensors", ad.state_dict(), {"trained_router_steps": "2000"}))
    assert legacy.zero_image == "pixel_black" and legacy.slots["zero image"] == "black pixels"
    save_adapter(legacy, tmp_path / "resaved.safetensors")  # re-saved: the convention is now written out
    assert load_adapter(tmp_path / "resaved.safetensors").meta["zero_image"] == "pixel_black"
    bad = write(tmp_path / "bad.safetensors", ad.state_dict(), {"zero_image": "grey"})
    with pytest.raises(CheckpointError, match="unknown zero image") as e:
        load_adapter(bad)
    assert "normalized_zeros, pixel_black" in str(e.value) and "grey" in e.value.detail
    with pytest.raises(CheckpointError, match="unknown zero image"):
        save_adapter(ad, tmp_path / "bad2.safetensors", extra_meta={"zero_image": "grey"})


def test_adapter_from_state_dict_copies_and_accepts_nested():
    sd = tiny_ipa_sd()
    ad = adapter_from_state_dict(nested(sd))
    assert ad.kind == KIND_IPADAPTER_PLUS and ad.num_tokens == 8
    ptrs = {v.data_ptr() for v in sd.values()}
    assert not any(p.data_ptr() in ptrs for p in ad.parameters())
    assert torch.equal(ad.subject_proj.latents, sd["image_proj.latents"])
    native = adapter_from_state_dict(tiny_adapter().state_dict())
    assert native.kind == KIND_NATIVE and native.has_router


# ------------------------------------------------------------------------------------------------
# IP-Adapter Plus SDXL ViT-H at full shapes
# ------------------------------------------------------------------------------------------------
def _check_full(ad: AnyStoryAdapter, sd: dict):
    assert ad.kind == KIND_IPADAPTER_PLUS and not ad.has_router
    assert ad.num_tokens == 16 and len(ad.ip_adapter) == 70
    ad.check_layout(sdxl_layout())
    assert ad.subject_proj.config["heads"] == 20 and ad.subject_proj.config["depth"] == 4
    assert ad.subject_proj.embedding_dim == 1280 and ad.subject_proj.output_dim == 2048
    mine = ad.state_dict()
    assert len(mine) == len(sd)
    for k, v in sd.items():
        k2 = "subject_proj." + k[len("image_proj."):] if k.startswith("image_proj.") else k
        assert mine[k2].dtype == torch.float16 and torch.equal(mine[k2], v), k


def test_ipadapter_plus_full_safetensors(full_ipa):
    ad = load_adapter(full_ipa["safetensors"])
    _check_full(ad, full_ipa["sd"])
    assert ad.meta["file_format"] == "pt" and ad.meta["variant"] == "plus"
    assert inspect_file(full_ipa["safetensors"]) == {
        "kind": "ip-adapter-plus-sdxl", "layers": 70, "subject_tokens": 16, "has_router": False,
        "reference_layers": 0, "file": "ip-adapter-plus_sdxl_vit-h.safetensors"}


def test_ipadapter_plus_full_bin_weights_only(full_ipa, monkeypatch):
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    ad = load_adapter(full_ipa["bin"])
    assert calls and all(kw.get("weights_only") is True and kw.get("map_location") == "cpu" for kw in calls)
    _check_full(ad, full_ipa["sd"])
    info = inspect_file(full_ipa["bin"])
    assert info["kind"] == "ip-adapter-plus-sdxl" and info["layers"] == 70 and info["subject_tokens"] == 16
    assert all(kw.get("weights_only") is True for kw in calls)


def test_ipadapter_plus_face_same_shapes(tmp_path):
    path = write(tmp_path / "ip-adapter-plus-face_sdxl_vit-h.safetensors", tiny_ipa_sd())
    ad = load_adapter(path)
    assert ad.kind == KIND_IPADAPTER_PLUS and ad.meta["variant"] == "plus-face"


def test_full_width_checks_on_shapes(full_ipa):
    """Checks that need full SDXL shapes, done on meta tensors (no memory): wrong layer width at 70
    layers, an InstantID-style 512-d input, ViT-L features."""
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in full_ipa["sd"].items()}
    bad = dict(meta)
    for w in ("to_k_ip", "to_v_ip"):
        bad[f"ip_adapter.1.{w}.weight"] = torch.empty(1280, 2048, dtype=torch.float16, device="meta")
    refused(lambda: adapter_from_state_dict(bad, name="wrong_width.safetensors"), "wrong_width.safetensors",
            "another UNet than SDXL", "ip-adapter-plus_sdxl_vit-h",
            detail=("ip_adapter.1.to_k_ip is 1280×2048", "width 640"))
    iid = dict(meta)
    iid["image_proj.proj_in.weight"] = torch.empty(1280, 512, dtype=torch.float16, device="meta")
    refused(lambda: adapter_from_state_dict(iid, name="ip-adapter.bin"), "ip-adapter.bin", "InstantID", detail=("512",))
    vitl = dict(meta)
    vitl["image_proj.proj_in.weight"] = torch.empty(1280, 1024, dtype=torch.float16, device="meta")
    refused(lambda: adapter_from_state_dict(vitl, name="kolors_plus.bin"), "kolors_plus.bin", "another image encoder",
            "CLIP ViT-L", detail=("1024-d image features",))


# ------------------------------------------------------------------------------------------------
# never unpickle code
# ------------------------------------------------------------------------------------------------
class SetstateBomb:
    """Unpickling this would call __setstate__ (code from this module)."""

    def __init__(self):
        self.payload = 1

    def __setstate__(self, state):
        builtins._anystory_setstate_ran = True
        self.__dict__.update(state)


class ReduceBomb:
    """Unpickling this would call exec(...) — the classic pickle attack."""

    def __reduce__(self):
        return (exec, ("import builtins; builtins._anystory_reduce_ran = True",))


@pytest.mark.parametrize("bomb", [ReduceBomb, SetstateBomb])
@pytest.mark.parametrize("ext", [".bin", ".pt", ".pth"])
def test_pickle_with_code_is_refused_and_never_run(tmp_path, bomb, ext):
    for flag in ("_anystory_reduce_ran", "_anystory_setstate_ran"):
        if hasattr(builtins, flag):
            delattr(builtins, flag)
    payload = nested(tiny_ipa_sd())
    payload["extra"] = bomb()
    path = write(tmp_path / f"ip-adapter-plus_sdxl_vit-h{ext}", payload)
    for fn in (lambda: load_adapter(path), lambda: inspect_file(path)):
        refused(fn, path, "could run code", "refused", "convert it to safetensors", detail=("not a weights-only file",))
    assert not getattr(builtins, "_anystory_reduce_ran", False)
    assert not getattr(builtins, "_anystory_setstate_ran", False)


# ------------------------------------------------------------------------------------------------
# refusals (file-level)
# ------------------------------------------------------------------------------------------------
def _unet_sd(prefix: str = PREFIX, conv_in_channels: int = 4, width: int = 32, ctx: int = 64) -> dict:
    """A small SDXL-shaped (ldm-named) UNet state dict by hand: conv_in, time/label embeddings, one
    transformer block in input 1, middle and output 2 (attn1, attn2, norm1-3, ff), out."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    sd = {prefix + "input_blocks.0.0.weight": r(width, conv_in_channels, 3, 3),
          prefix + "input_blocks.0.0.bias": r(width),
          prefix + "time_embed.0.weight": r(4 * width, width),
          prefix + "label_emb.0.0.weight": r(4 * width, 2816),
          prefix + "out.2.weight": r(4, width, 3, 3)}
    for blk, c in (("input_blocks.1.1", width), ("middle_block.1", 2 * width), ("output_blocks.2.1", width)):
        sd[f"{prefix}{blk}.proj_in.weight"] = r(c, c)
        t = f"{prefix}{blk}.transformer_blocks.0."
        for n in ("norm1", "norm2", "norm3"):
            sd[t + n + ".weight"], sd[t + n + ".bias"] = r(c), r(c)
        for w in ("to_q", "to_k", "to_v"):
            sd[t + f"attn1.{w}.weight"] = r(c, c)
        sd[t + "attn1.to_out.0.weight"] = r(c, c)
        sd[t + "attn2.to_q.weight"] = r(c, c)
        sd[t + "attn2.to_k.weight"], sd[t + "attn2.to_v.weight"] = r(c, ctx), r(c, ctx)
        sd[t + "attn2.to_out.0.weight"] = r(c, c)
        sd[t + "ff.net.0.proj.weight"], sd[t + "ff.net.2.weight"] = r(8 * c, c), r(c, 4 * c)
    return sd


def _native_file_sd() -> dict:
    return tiny_adapter().state_dict()


def _case_files(tmp_path):
    """(file name, contents, metadata, words of the message, fragments of the detail) for every refusal."""
    small = tiny_layout()
    ipa = tiny_ipa_sd()
    nat = _native_file_sd()
    cases = []

    def add(name, sd, found, detail, meta=None):
        cases.append((name, sd, meta, found, detail))

    add("ip-adapter-plus_sd15.safetensors", sd15_ipadapter_plus_state_dict(),
        ["SD1.5 IP-Adapter", "do not fit SDXL", "ip-adapter-plus_sdxl_vit-h"], ["768", "1..31"])
    add("ip-adapter-plus_sd15.bin", nested(sd15_ipadapter_plus_state_dict()), ["SD1.5"], ["768"])
    add("ip-adapter_sdxl_vit-h.safetensors", ipadapter_nonplus_state_dict(sdxl_layout()),
        ["non-Plus SDXL IP-Adapter", "Plus (Resampler)"], ["image_proj.proj"])
    add("ip-adapter_sd15.safetensors", ipadapter_nonplus_state_dict(sd15_layout(), context_dim=768),
        ["non-Plus SD1.5 IP-Adapter"], ["no image_proj.latents"])
    add("ip-adapter-faceid_sdxl.bin", nested(ipadapter_faceid_state_dict(small)), ["FaceID", "InsightFace"],
        ["image_proj.proj.0"])
    add("ip-adapter-faceid-plusv2_sdxl.safetensors", ipadapter_faceid_state_dict(small, plus=True), ["FaceID"],
        ["FaceID key"])
    lora_only = dict(ipa)
    lora_only["ip_adapter.0.to_q_lora.down.weight"] = torch.zeros(4, 64)
    add("plus_with_lora.safetensors", lora_only, ["FaceID"], ["to_q_lora"])
    named = dict(ipa)
    named["image_proj.faceid_marker"] = torch.zeros(1)
    add("some_faceid.safetensors", named, ["FaceID"], ["faceid_marker"])
    add("flux-ip-adapter.safetensors", flux_ipadapter_state_dict(), ["Flux", "do not fit SDXL"],
        ["ip_adapter_double_stream"])
    add("flux1-dev.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, ["Flux"],
        ["double_blocks."])
    ckpt = _unet_sd()
    ckpt["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2, 3, 3, 3)
    ckpt["conditioner.embedders.0.transformer.x"] = torch.zeros(2)
    add("sd_xl_base_1.0.safetensors", ckpt, ["whole SD/SDXL checkpoint", "Load Checkpoint"], ["model.diffusion_model."])
    add("anystory_sdxl_refnet.safetensors",
        {"refnet." + k: v for k, v in build_refnet_state_dict(_unet_sd()).items()},
        ["ReferenceNet file", "ReferenceNet slot"], ["refnet."], {"format": FORMAT_REFNET})
    add("my_lora.safetensors", {"lora_unet_input_blocks_4_1.lora_down.weight": torch.zeros(4, 4)},
        ["LoRA", "LoRA loader"], ["lora_unet_"])
    add("clip_vision_h.safetensors", {"vision_model.embeddings.class_embedding": torch.zeros(4)},
        ["CLIP vision model", "Load CLIP Vision"], ["vision_model."])
    add("random.safetensors", {"foo.bar": torch.zeros(3)}, ["not a known adapter file"],
        ["not a known adapter layout", "foo.bar"])
    add("empty.safetensors", {}, ["empty"], [])
    add("empty.bin", {}, ["empty"], [])

    def edit(base, name, found, detail, fn, meta=None):
        sd = dict(base)
        fn(sd)
        add(name, sd, found, detail, meta)

    damaged_ipa = ["an IP-Adapter file that is damaged or incomplete"]
    damaged_native = ["a native AnyStory file that is damaged or incomplete"]
    edit(ipa, "latents_2d.safetensors", damaged_ipa, ["image_proj.latents", "not 3-D"],
         lambda s: s.__setitem__("image_proj.latents", s["image_proj.latents"][0]))
    edit(ipa, "kv_mismatch.safetensors", damaged_ipa, ["to_k_ip 64×2048", "to_v_ip 128×2048"],
         lambda s: s.__setitem__("ip_adapter.3.to_v_ip.weight", torch.zeros(128, 2048)))
    edit(ipa, "no_v.safetensors", damaged_ipa, ["no 'ip_adapter.3.to_v_ip.weight'"],
         lambda s: s.pop("ip_adapter.3.to_v_ip.weight"))
    edit(ipa, "gap.safetensors", damaged_ipa, ["missing [3]"],
         lambda s: [s.pop(f"ip_adapter.3.{w}.weight") for w in ("to_k_ip", "to_v_ip")])
    edit(ipa, "even.safetensors", damaged_ipa, ["unexpected [8]"],
         lambda s: [s.__setitem__(f"ip_adapter.8.{w}.weight", torch.zeros(64, 2048)) for w in ("to_k_ip", "to_v_ip")])
    edit(ipa, "k_3d.safetensors", damaged_ipa, ["'ip_adapter.1.to_k_ip.weight' has shape 64×2048×1"],
         lambda s: s.__setitem__("ip_adapter.1.to_k_ip.weight", torch.zeros(64, 2048, 1)))
    edit(ipa, "no_proj.safetensors", ["incomplete IP-Adapter"], ["ip_adapter.* weights but no image projection"],
         lambda s: [s.pop(k) for k in list(s) if k.startswith("image_proj.")])
    edit(ipa, "no_layers.safetensors", ["an IP-Adapter file without its per-layer weights"],
         ["no ip_adapter.N.to_k_ip.weight"], lambda s: [s.pop(k) for k in list(s) if k.startswith("ip_adapter.")])
    edit(ipa, "no_proj_out.safetensors", damaged_ipa, ["'image_proj.proj_out.weight' is missing"],
         lambda s: s.pop("image_proj.proj_out.weight"))
    edit(ipa, "bad_ff.safetensors", damaged_ipa, ["wrong shapes", "image_proj.layers.0.1.3.weight"],
         lambda s: s.__setitem__("image_proj.layers.0.1.3.weight", torch.zeros(64, 100)))
    edit(ipa, "int.safetensors", ["quantised"], ["non-float tensor 'image_proj.proj_in.bias'"],
         lambda s: s.__setitem__("image_proj.proj_in.bias", torch.zeros(64, dtype=torch.int8)))
    edit(nat, "extra_key.safetensors", damaged_native, ["unexpected", "router.1.extra.weight"],
         lambda s: s.__setitem__("router.1.extra.weight", torch.zeros(2)), {"format": "anystory-sdxl"})
    edit(nat, "meta_m.safetensors", ["metadata does not match its weights"], ["subject_tokens=64", "have 8"],
         lambda s: None, {"format": "anystory-sdxl", "subject_tokens": "64"})
    edit(nat, "newer.safetensors", ["newer format (version 2)", "update comfyui-anystory"], ["format version 2"],
         lambda s: None, {"format": "anystory-sdxl", "version": "2"})
    edit(nat, "router_only.safetensors", ["incomplete AnyStory model"], ["without the routing QFormer"],
         lambda s: [s.pop(k) for k in list(s) if k.startswith("routing_proj.")])
    wt = {f"reference_proj.{n}.{w}.weight": torch.zeros(c, c) for n, c in tiny_adapter().layer_dims.items()
          for w in ("to_k", "to_v")}
    edit(nat, "ref_proj_shape.safetensors", damaged_native, ["'reference_proj.7.to_v.weight' has shape 64×64",
                                                              "layer 7 is 128 wide"],
         lambda s: s.update(wt, **{"reference_proj.7.to_v.weight": torch.zeros(64, 64)}))
    edit(nat, "ref_proj_no_v.safetensors", damaged_native, ["no 'reference_proj.3.to_v.weight'"],
         lambda s: s.update({"reference_proj.3.to_k.weight": torch.zeros(64, 64)}))
    edit(nat, "ref_proj_layer.safetensors", damaged_native, ["reference projections for layer 9"],
         lambda s: s.update({f"reference_proj.9.{w}.weight": torch.zeros(64, 64) for w in ("to_k", "to_v")}))
    edit(nat, "ref_proj_bias.safetensors", ["adapter variant AnyStory does not know"],
         ["reference_proj.1.to_k.bias"],
         lambda s: s.update(wt, **{"reference_proj.1.to_k.bias": torch.zeros(64)}))
    edit(nat, "ref_proj_meta.safetensors", ["metadata does not match its weights"],
         ["reference_layers=2", "have 0"], lambda s: None, {"format": "anystory-sdxl", "reference_layers": "2"})
    edit(ipa, "ipa_ref_proj.safetensors", ["IP-Adapter with reference projections"], ["reference_proj.1.to_k.weight"],
         lambda s: s.update(wt))
    edit(nat, "router_gap.safetensors", damaged_native, ["router missing for [3]"],
         lambda s: [s.pop(k) for k in list(s) if k.startswith("router.3.")])
    edit(nat, "mixed.safetensors", ["mixes an AnyStory model and an IP-Adapter"],
         ["both subject_proj.* and image_proj.*"],
         lambda s: s.__setitem__("image_proj.latents", torch.zeros(1, 8, 64)))
    edit(nat, "fmt_but_ipa.safetensors", ["damaged AnyStory model"],
         ["format=anystory-sdxl but which has no subject_proj"],
         lambda s: s.clear() or s.update(ipa), {"format": "anystory-sdxl"})
    return cases


def test_rejections(tmp_path):
    n = 0
    for name, sd, meta, found, detail in _case_files(tmp_path):
        path = write(tmp_path / name, sd, meta)
        refused(lambda: load_adapter(path), path, *found, detail=tuple(detail))
        if name.endswith(".safetensors") and "refnet" not in name:  # the cheap UI path refuses the same
            refused(lambda: inspect_file(path), path, *found, detail=tuple(detail))  # (a ReferenceNet it describes)
        n += 1
    assert n >= 35


def test_rejections_of_broken_files(tmp_path, full_ipa):
    # truncated safetensors (a partial download) and a truncated .bin
    src = full_ipa["safetensors"]
    with open(src, "rb") as f:
        head = f.read(3_000_000)
    trunc = tmp_path / "ip-adapter-plus_sdxl_vit-h.safetensors"
    trunc.write_bytes(head)
    refused(lambda: load_adapter(trunc), str(trunc), "truncated or corrupted", "re-download or re-create",
            detail=("the header describes",))
    refused(lambda: inspect_file(trunc), str(trunc), "truncated or corrupted")
    with open(full_ipa["bin"], "rb") as f:
        head = f.read(3_000_000)
    tb = tmp_path / "ip-adapter-plus_sdxl_vit-h.bin"
    tb.write_bytes(head)
    refused(lambda: load_adapter(tb), str(tb), "truncated or corrupted", "re-download", detail=("PyTorch file",))
    # garbage, tiny, and a pickle renamed .safetensors
    g = tmp_path / "garbage.safetensors"
    g.write_bytes(b"this is not a safetensors file at all" * 10)
    refused(lambda: load_adapter(g), str(g), "truncated or corrupted")
    t = tmp_path / "tiny.safetensors"
    t.write_bytes(b"abc")
    refused(lambda: load_adapter(t), str(t), "truncated or corrupted", "only 3 bytes")
    p = tmp_path / "renamed.safetensors"
    torch.save(nested(tiny_ipa_sd()), p)
    refused(lambda: load_adapter(p), str(p), "PyTorch pickle/zip file with a .safetensors name", "rename it to .bin")
    # legacy (non-zip) torch file, truncated
    leg = tmp_path / "legacy.pt"
    torch.save(nested(tiny_ipa_sd()), leg, _use_new_zipfile_serialization=False)
    assert load_adapter(leg).kind == KIND_IPADAPTER_PLUS  # a legacy weights-only file is fine
    leg.write_bytes(leg.read_bytes()[:5000])
    refused(lambda: load_adapter(leg), str(leg), "truncated or corrupted")
    # not a dict
    lst = tmp_path / "list.bin"
    torch.save([torch.zeros(2)], lst)
    refused(lambda: load_adapter(lst), str(lst), "a file holding a list")
    # unknown extension, missing file, a directory
    for ext in (".gguf", ".ckpt", ".onnx"):
        u = tmp_path / f"model{ext}"
        u.write_bytes(b"x")
        refused(lambda: load_adapter(u), str(u), f"unsupported extension '{ext}'")
    missing = tmp_path / "nope.safetensors"
    refused(lambda: load_adapter(missing), str(missing), "no such file")
    refused(lambda: inspect_file(missing), str(missing), "no such file")
    refused(lambda: load_adapter(tmp_path), str(tmp_path), "a directory")


def test_save_adapter_refuses_other_extension(tmp_path):
    target = tmp_path / "out.bin"
    refused(lambda: save_adapter(tiny_adapter(), target), str(target), "without the .safetensors extension")
    assert not target.exists()


# ------------------------------------------------------------------------------------------------
# ReferenceNet
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [PREFIX, ""])
def test_build_refnet_state_dict(prefix):
    unet = _unet_sd(prefix)
    if prefix:
        unet["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2, 3, 3, 3)
        unet["conditioner.embedders.0.model.x"] = torch.zeros(2)
    ref = build_refnet_state_dict(unet)
    assert not any(k.startswith((PREFIX, "first_stage_model.", "conditioner.")) for k in ref)
    assert not any(".attn2." in k or ".norm2." in k for k in ref)
    assert any(".attn1.to_q." in k for k in ref) and any(".norm1." in k for k in ref)
    assert any(".norm3." in k for k in ref) and "out.2.weight" in ref and "label_emb.0.0.weight" in ref
    conv, src = ref["input_blocks.0.0.weight"], unet[prefix + "input_blocks.0.0.weight"]
    assert conv.shape == (32, 5, 3, 3)
    assert torch.equal(conv[:, :4], src) and torch.count_nonzero(conv[:, 4]) == 0
    kept = {k[len(prefix):] for k in unet if k.startswith(prefix) and ".attn2." not in k and ".norm2." not in k
            and not k.startswith(("first_stage_model.", "conditioner."))}
    assert set(ref) == kept
    for k in kept - {"input_blocks.0.0.weight"}:
        assert torch.equal(ref[k], unet[prefix + k])


def test_layout_from_state_dict_on_unet_and_refnet():
    unet = _unet_sd()
    want = {("input", 1, 0): 32, ("middle", 0, 0): 64, ("output", 2, 0): 32}
    lay = layout_from_state_dict(unet, prefix=PREFIX)
    assert {s.key: s.dim for s in lay} == want
    assert [s.key for s in lay] == [("input", 1, 0), ("middle", 0, 0), ("output", 2, 0)]  # execution order
    assert lay.by_key(("middle", 0, 0)).ckpt_index == 5  # checkpoint order: input, output, middle
    ref = layout_from_state_dict(build_refnet_state_dict(unet))
    assert {s.key: s.dim for s in ref} == want
    assert lay.signature() == ref.signature()


def test_refnet_round_trip(tmp_path):
    ref = build_refnet_state_dict(_unet_sd())
    path = tmp_path / "anystory_sdxl_refnet.safetensors"
    save_refnet(ref, path, meta={"base": "tiny"})
    w = load_refnet(path)
    assert isinstance(w, RefNetWeights) and w.in_channels == 5
    assert_state_equal(ref, w.state_dict)
    assert w.meta["format"] == FORMAT_REFNET and w.meta["refnet_in_channels"] == "5"
    assert w.meta["version"] == "1" and w.meta["base"] == "tiny" and w.meta["layers"] == "3"
    assert len(w.layout()) == 3
    assert inspect_file(path) == {"kind": FORMAT_REFNET, "layers": 3, "subject_tokens": 0, "has_router": False,
                                  "file": "anystory_sdxl_refnet.safetensors", "in_channels": 5}
    # the ReferenceNet is refused as an adapter, and an adapter as a ReferenceNet
    refused(lambda: load_adapter(path), str(path), "ReferenceNet file", "ReferenceNet slot", detail=("refnet.",))
    ap = tmp_path / "anystory_sdxl.safetensors"
    save_adapter(tiny_adapter(), ap)
    refused(lambda: load_refnet(ap), str(ap), "an adapter file", "pick it as the AnyStory model",
            detail=("adapter keys such as",))


def test_refnet_four_channels_only_with_metadata(tmp_path):
    ref = build_refnet_state_dict(_unet_sd())
    ref4 = dict(ref)
    ref4["input_blocks.0.0.weight"] = ref["input_blocks.0.0.weight"][:, :4].contiguous()
    pre = {"refnet." + k: v for k, v in ref4.items()}
    no_meta = write(tmp_path / "refnet4.safetensors", pre, {"format": FORMAT_REFNET})
    refused(lambda: load_refnet(no_meta), no_meta, "does not take the latent and the subject mask",
            detail=("4 input channels", "32×4×3×3"))
    ok = write(tmp_path / "refnet4_ok.safetensors", pre, {"format": FORMAT_REFNET, "refnet_in_channels": "4"})
    assert load_refnet(ok).in_channels == 4
    save_refnet(ref4, tmp_path / "saved4.safetensors")  # save_refnet records the 4 channels it writes
    assert load_refnet(tmp_path / "saved4.safetensors").in_channels == 4
    lie = write(tmp_path / "refnet_lie.safetensors", {"refnet." + k: v for k, v in ref.items()},
                {"format": FORMAT_REFNET, "refnet_in_channels": "4"})
    refused(lambda: load_refnet(lie), lie, "metadata does not match its weights",
            detail=("refnet_in_channels=4", "takes 5 channels"))


def test_refnet_rejections(tmp_path, full_ipa):
    unet = _unet_sd()
    normal = write(tmp_path / "sd_xl_base_1.0.safetensors", unet)
    refused(lambda: load_refnet(normal), normal, "normal SD/SDXL UNet", "anystory_sdxl_refnet.safetensors",
            detail=("attn2",))
    with_attn2 = write(tmp_path / "refnet_attn2.safetensors", {"refnet." + k[len(PREFIX):]: v for k, v in unet.items()})
    refused(lambda: load_refnet(with_attn2), with_attn2, "cross-attention weights", detail=("attn2",))
    ref = build_refnet_state_dict(unet)
    no_conv = {"refnet." + k: v for k, v in ref.items() if k != "input_blocks.0.0.weight"}
    p = write(tmp_path / "refnet_noconv.safetensors", no_conv, {"format": FORMAT_REFNET})
    refused(lambda: load_refnet(p), p, "ReferenceNet file that is damaged", detail=("without conv_in",))
    no_blocks = {"refnet." + k: v for k, v in ref.items() if "transformer_blocks" not in k}
    p = write(tmp_path / "refnet_noblocks.safetensors", no_blocks)
    refused(lambda: load_refnet(p), p, "without attention blocks", detail=("without transformer blocks",))
    mixed = {"refnet." + k: v for k, v in ref.items()}
    mixed["subject_proj.latents"] = torch.zeros(1, 2, 4)
    p = write(tmp_path / "refnet_mixed.safetensors", mixed)
    refused(lambda: load_refnet(p), p, "mixed with other weights",
            detail=("keys outside refnet.*", "subject_proj.latents"))
    p = write(tmp_path / "refnet_fmt.safetensors", {"refnet." + k: v for k, v in ref.items()},
              {"format": "anystory-sdxl"})
    refused(lambda: load_refnet(p), p, "another kind of AnyStory file", detail=("format=anystory-sdxl",))
    p = tmp_path / "refnet.bin"
    torch.save({"refnet." + k: v for k, v in ref.items()}, p)
    # a .bin ReferenceNet is read weights-only, and accepted
    assert load_refnet(p).in_channels == 5
    good = tmp_path / "anystory_sdxl_refnet.safetensors"
    save_refnet(ref, good)
    data = good.read_bytes()
    trunc = tmp_path / "refnet_trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    refused(lambda: load_refnet(trunc), str(trunc), "truncated or corrupted")
    refused(lambda: load_refnet(full_ipa["safetensors"]), full_ipa["safetensors"], "an adapter file",
            detail=("image_proj.",))
    # save_refnet validates too
    target = tmp_path / "bad_refnet.safetensors"
    refused(lambda: save_refnet({k[len(PREFIX):]: v for k, v in unet.items()}, target), str(target),
            "cross-attention", detail=("attn2",))
    assert not target.exists()


def test_build_refnet_rejections():
    refused(lambda: build_refnet_state_dict({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, name="unet_d"),
            "unet_d", "diffusers-format UNet", detail=("down_blocks.0",))
    done = build_refnet_state_dict(_unet_sd())
    refused(lambda: build_refnet_state_dict({"refnet." + k: v for k, v in done.items()}), "<state dict>",
            "already a ReferenceNet", "refnet_name")
    refused(lambda: build_refnet_state_dict(done), "<state dict>", "not a plain SDXL UNet",
            detail=("5 input channels",))
    sd15 = _unet_sd(width=320, ctx=768)
    refused(lambda: build_refnet_state_dict(sd15, name="v1-5.safetensors"), "v1-5.safetensors", "SD1.x UNet",
            detail=("768",))
    refused(lambda: build_refnet_state_dict({"foo": torch.zeros(1)}), "<state dict>", "not a UNet", detail=("'foo'",))


def test_refusal_evidence_goes_to_the_log_not_the_message(tmp_path, caplog):
    path = write(tmp_path / "ip-adapter-plus_sd15.safetensors", sd15_ipadapter_plus_state_dict())
    with caplog.at_level(logging.WARNING, logger="anystory"):
        e = refused(lambda: load_adapter(path), path, "SD1.5 IP-Adapter", detail=("768",))
    assert "768" not in str(e) and "ip_adapter" not in str(e)
    logged = [r.getMessage() for r in caplog.records if r.name == "anystory"]
    assert any(path in m and e.detail in m for m in logged), logged
    assert e.found == "an SD1.5 IP-Adapter" and e.path == path and "ip_adapter.N.to_k_ip" in e.expected


def test_no_file_given():
    for empty in (None, ""):
        with pytest.raises(CheckpointError) as ei:
            load_adapter(empty)
        assert str(ei.value) == "AnyStory: no file was given for the AnyStory model — pick a file."
