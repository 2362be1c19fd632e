"""Issue #6 — reliability, through REAL ComfyUI: bad inputs, a short soak, interrupts, unpatched models, loading
rules.

Through the session server (``comfy_server``, /prompt), most cases: a bad input must give a message that says
what is wrong, where and how to fix it (asserted on specific words), the server keeps serving, and the next
valid prompt renders the SAME pixels as before (``Rig.check_valid``: a two-subject render whose KSampler is
really re-run, compared with the reference made at the start). In-process (``env``, tiny model) the cases no
stock node can produce: NaN images/masks, 9 subjects, an fp16 model that overflows, a Flux-class MODEL without a
file, an interrupt from the sampler callback, a preview of a sampling AnyStory never acted in, an allocator-independent
leak check (live tensors and AnyStory objects over many runs), the network guard. The 200-prompt soak with RSS/VRAM
numbers is bench/soak.py (not CI); test_short_soak_no_failures_bounded_memory is its CI-sized version.

Time: every prompt keeps the expensive nodes (checkpoint, CLIP vision, the two encoded subjects, the prompts)
in it as unconnected "anchors", so ComfyUI's cache keeps them and no subject is encoded twice; new subjects are
encoded with reference "off" unless the references are the point.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
from pathlib import Path

import pytest
from comfy_harness import load_module as _load, model_folders  # registered by tests/nodes/conftest.py

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]




F = _load("anystory_fixtures", HERE / "anystory_fixtures.py")
env = F.env            # in-process tiny SDXL + random AnyStory (module scope)
temp_dir = F.temp_dir

# the nodes of example_workflows/api/06_anystory_sdxl_your_trained_router.json that every prompt keeps (cached)
ANCHORS = ("1", "2", "3", "10", "11", "12", "13", "14", "15", "20", "21", "22")
VALID_SEED = 7


# ------------------------------------------------------------------------------------------------
# files for the bad cases (written by the tests into the server's models/ and input/ folders)
# ------------------------------------------------------------------------------------------------
class _Evil:
    """A pickle that would create a folder if it were ever unpickled with code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _tiny_layout():
    from anystory.layers import LayerLayout
    return LayerLayout([(("input", 4, 0), 64, 1)])


def _save(sd, path: Path, meta=None):
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)


def write_bad_files(base: Path, files: dict) -> dict:
    """Every bad file of the matrix; returns {case: path}. Small: tiny layouts, headers, meta shapes."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    import anystory.synthetic as syn

    models = base / "models"
    ad = models / "anystory"
    out = {}
    lay = _tiny_layout()
    good = syn.ipadapter_plus_state_dict(lay, num_tokens=4, qformer_dim=64, depth=1)
    out["tiny_1layer"] = ad / "rel_tiny-1layer_ip-adapter-plus.safetensors"
    _save(good, out["tiny_1layer"])
    raw = out["tiny_1layer"].read_bytes()
    n = int.from_bytes(raw[:8], "little")
    out["truncated"] = ad / "rel_truncated.safetensors"
    out["truncated"].write_bytes(raw[: 8 + n + (len(raw) - 8 - n) // 2])
    out["corrupt_header"] = ad / "rel_corrupt-header.safetensors"
    out["corrupt_header"].write_bytes(raw[:8] + bytes((i * 37 + 11) % 256 for i in range(n)) + raw[8 + n:])
    bad = dict(good)
    bad["image_proj.proj_out.weight"] = torch.full_like(bad["image_proj.proj_out.weight"], float("nan"))
    out["nan_weights"] = ad / "rel_nan-weights.safetensors"
    _save(bad, out["nan_weights"])
    out["empty"] = ad / "rel_empty.safetensors"
    out["empty"].write_bytes(b"")
    out["pickle_renamed"] = ad / "rel_pickle-renamed.safetensors"
    torch.save(good, out["pickle_renamed"])
    out["sd15"] = ad / "rel_ip-adapter-plus_sd15.safetensors"
    _save(syn.sd15_ipadapter_plus_state_dict(), out["sd15"])
    out["faceid"] = ad / "rel_ip-adapter-faceid-plusv2_sdxl.safetensors"
    _save(syn.ipadapter_faceid_state_dict(lay, plus=True), out["faceid"])
    out["flux_adapter"] = ad / "rel_flux-ip-adapter.safetensors"
    _save(syn.flux_ipadapter_state_dict(), out["flux_adapter"])
    out["nonplus"] = ad / "rel_ip-adapter_sdxl_vit-h.safetensors"
    _save(syn.ipadapter_nonplus_state_dict(lay, clip_dim=64), out["nonplus"])
    out["marker"] = base / "rel_pickle_ran_code"
    out["evil"] = ad / "rel_evil.bin"
    torch.save({"image_proj": {"latents": torch.zeros(1, 4, 64)}, "x": _Evil(out["marker"])}, out["evil"])
    refnet = (ad / files["refnet"]).resolve()
    with open(refnet, "rb") as f:
        head = f.read(8)
        rn = int.from_bytes(head, "little")
        chunk = head + f.read(rn + 4096)
    out["refnet_truncated"] = ad / "rel_refnet-truncated.safetensors"
    out["refnet_truncated"].write_bytes(chunk)

    # a CLIP ViT-L/14 vision model as comfy.clip_vision.load detects it (24 layers, 1024 wide); only the keys
    # that decide the architecture (the rest stays at ComfyUI's init)
    out["clip_l"] = models / "clip_vision" / "rel_clip-vit-l-14.safetensors"
    _save({"vision_model.encoder.layers.22.layer_norm1.weight": torch.ones(1024, dtype=torch.float16),
           "vision_model.encoder.layers.0.layer_norm1.weight": torch.ones(1024, dtype=torch.float16),
           "vision_model.embeddings.position_embedding.weight": torch.zeros(257, 1024, dtype=torch.float16)},
          out["clip_l"])
    # an SD1.5 UNet (ComfyUI detects model_channels 320 + context 768 as SD15) and a Flux transformer (only the
    # keys Flux detection reads: ComfyUI builds the model class, it is never sampled)
    out["sd15_unet"] = models / "diffusion_models" / "rel_sd15-unet.safetensors"
    _save(sd15_unet_state_dict(), out["sd15_unet"])
    out["flux_unet"] = models / "diffusion_models" / "rel_flux-dev.safetensors"
    _save({"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(128, dtype=torch.float16),
           "img_in.weight": torch.zeros(3072, 64, dtype=torch.float16),
           "vector_in.in_layer.weight": torch.zeros(3072, 768, dtype=torch.float16)}, out["flux_unet"])

    # images: a subject without alpha, a smaller mask, left/right region masks
    inp = base / "input"
    img = Image.new("RGB", (80, 96), (90, 140, 200))
    d = ImageDraw.Draw(img)
    d.ellipse([16, 20, 64, 84], fill=(230, 60, 40))
    d.rectangle([30, 40, 50, 60], fill=(250, 230, 60))
    out["rgb"] = inp / "rel_subject_rgb.png"
    img.save(out["rgb"])
    m = Image.new("L", (40, 48), 0)
    ImageDraw.Draw(m).ellipse([8, 10, 32, 42], fill=255)
    out["mask_small"] = inp / "rel_mask_small.png"
    m.save(out["mask_small"])
    for side in ("left", "right"):
        a = np.zeros((64, 64, 3), np.uint8)
        if side == "left":
            a[:, :32] = 255
        else:
            a[:, 32:] = 255
        out[side] = inp / f"rel_{side}.png"
        Image.fromarray(a).save(out[side])
    return out


def sd15_unet_state_dict() -> dict:
    """Zeros with the key names and shapes of a small SD1.5 UNet (one level of 320 channels, context 768)."""
    import torch

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
           "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
           "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
           "transformer_depth_middle": -1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
           "num_head_channels": -1, "use_temporal_resblock": False, "use_temporal_attention": False}
    u = UNetModel(**cfg, operations=comfy.ops.disable_weight_init, device="meta", dtype=torch.float16)
    return {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in u.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# the rig: the session server, a valid reference render, helpers
# ------------------------------------------------------------------------------------------------
class Rig:
    def __init__(self, srv, files, demo, harness, bad):
        self.srv, self.files, self.demo, self.H, self.bad = srv, files, demo, harness, bad
        self.refs: dict = {}
        self.variant = True
        self.plain = None
        self.valid_runs = 0

    # graphs ---------------------------------------------------------------------------------------
    def full(self, size=64, steps=2, variant=True, prefix="rel_valid") -> dict:
        """The shipped two-subject graph. ``variant`` flips the attention router's threshold, which the native
        (learned) router does not use: the same image under another cache key, so ComfyUI really re-runs it."""
        wf = self.demo.demo_workflow("06_anystory_sdxl_your_trained_router", self.files, size=size, steps=steps)
        wf["30"]["inputs"]["region_threshold"] = 0.35 if variant else 0.36
        wf["40"]["inputs"]["seed"] = VALID_SEED
        wf["42"]["inputs"]["filename_prefix"] = prefix
        return wf

    def anchors(self) -> dict:
        wf = self.full()
        return {k: v for k, v in wf.items() if k in ANCHORS}

    def plain_graph(self) -> dict:
        """txt2img with the checkpoint's MODEL, no AnyStory (same loader/prompt nodes as the anchors)."""
        g = self.anchors()
        g["60"] = {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["22", 0], "negative": ["20", 0],
                                                        "latent_image": ["21", 0], "seed": 11, "steps": 2, "cfg": 5.0,
                                                        "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
        g["61"] = {"class_type": "VAEDecode", "inputs": {"samples": ["60", 0], "vae": ["1", 2]}}
        g["62"] = {"class_type": "SaveImage", "inputs": {"images": ["61", 0], "filename_prefix": "rel_plain"}}
        return g

    def probe(self, node: dict, out=0) -> dict:
        """anchors + ``node`` (as "100") → PreviewAny (an output node, so it runs)."""
        g = self.anchors()
        g["100"] = node
        g["101"] = {"class_type": "PreviewAny", "inputs": {"source": ["100", out]}}
        return g

    @staticmethod
    def loader(model_name, refnet_name="none") -> dict:
        return {"class_type": "AnyStoryModelLoader", "inputs": {"model_name": model_name, "refnet_name": refnet_name}}

    @staticmethod
    def encode(image, mask=None, subjects=None, anystory=("3", 0), clip=("2", 0), model=("1", 0),
               label="", reference="off") -> dict:
        ins = {"anystory": list(anystory), "clip_vision": list(clip), "vae": ["1", 2], "image": list(image),
               "label": label, "strength": 1.0, "reference": reference}
        if mask is not None:
            ins["mask"] = list(mask)
        if model is not None:
            ins["model"] = list(model)
        if subjects is not None:
            ins["subjects"] = list(subjects)
        return {"class_type": "AnyStorySubjectEncode", "inputs": ins}

    @staticmethod
    def apply(subjects, model=("1", 0), anystory=("3", 0), **kw) -> dict:  # the old input names (still read)
        ins = {"model": list(model), "anystory": list(anystory), "subjects": list(subjects), "router_mode": "auto",
               "eta": 1.0, "gamma": 1.0, "start_percent": 0.0, "end_percent": 1.0, "record_routing": True,
               "feather": 0, "warmup_steps": 2, "threshold": 0.35}
        ins.update(kw)
        return {"class_type": "AnyStoryApply", "inputs": ins}

    @staticmethod
    def render(g: dict, model, nid: str, prefix: str, width=64, height=64, batch=1, cfg=5.0, steps=2, seed=3,
               positive=("22", 0), sampler="euler", scheduler="normal") -> None:
        """Add latent → KSampler → VAEDecode → SaveImage under ids nid+"a".."d"."""
        g[nid + "a"] = {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height,
                                                                     "batch_size": batch}}
        g[nid + "b"] = {"class_type": "KSampler", "inputs": {
            "model": list(model), "positive": list(positive), "negative": ["20", 0], "latent_image": [nid + "a", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0}}
        g[nid + "c"] = {"class_type": "VAEDecode", "inputs": {"samples": [nid + "b", 0], "vae": ["1", 2]}}
        g[nid + "d"] = {"class_type": "SaveImage", "inputs": {"images": [nid + "c", 0], "filename_prefix": prefix}}

    # running --------------------------------------------------------------------------------------
    def run(self, wf: dict, timeout: float = 900.0) -> dict:
        """queue + wait, robust to a slow /history answer on a loaded machine (the server keeps serving)."""
        pid = self.srv.queue_prompt(wf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                entry = self.srv.history(pid)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
                entry = None
            if entry is not None:
                st = entry.get("status") or {}
                if st.get("completed") or st.get("status_str") in ("success", "error"):
                    return entry
            assert self.srv.alive, f"ComfyUI died\n{self.srv.log_tail(60)}"
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} not done after {timeout:.0f} s\n{self.srv.log_tail(40)}")

    def ok(self, wf: dict) -> dict:
        entry = self.run(wf)
        err = self.H.execution_error(entry)
        assert err is None, f"expected success, got {json.dumps(err, indent=1)[:3000]}"
        return entry

    def fail(self, wf: dict, node_type: str, *words: str) -> str:
        """The prompt fails at ``node_type`` with a message containing every word (case-insensitive)."""
        entry = self.run(wf)
        err = self.H.execution_error(entry)
        assert err is not None, f"expected an error at {node_type}, the prompt succeeded"
        msg = err.get("exception_message", "")
        assert err.get("node_type") == node_type, (err.get("node_type"), msg)
        assert "Traceback" not in msg
        for w in words:
            assert w.lower() in msg.lower(), f"{w!r} not in the message: {msg}"
        assert self.srv.alive
        return msg

    def reject(self, wf: dict, *words: str) -> str:
        status, body = self.srv.validate(wf)
        assert status == 400, f"expected HTTP 400, got {status}: {body}"
        text = json.dumps(body)
        for w in words:
            assert w.lower() in text.lower(), f"{w!r} not in the rejection: {text[:2000]}"
        return text

    @staticmethod
    def cached(entry) -> set:
        return {n for m in entry["status"]["messages"] if m[0] == "execution_cached" for n in m[1].get("nodes", [])}

    def images(self, entry, node: str):
        import numpy as np
        from PIL import Image
        out = []
        for f in (entry.get("outputs", {}).get(node, {}) or {}).get("images", []):
            root = self.srv.base_dir / ("temp" if f.get("type") == "temp" else "output")
            p = root / f.get("subfolder", "") / f["filename"]
            out.append(np.asarray(Image.open(p).convert("RGB")))
        return out

    def check_valid(self):
        """A valid two-subject render, really re-executed (KSampler not cached), gives the reference pixels."""
        import numpy as np
        self.variant = not self.variant
        entry = self.ok(self.full(variant=self.variant))
        assert "40" not in self.cached(entry), "the valid render was served from the cache, not re-run"
        img = self.images(entry, "42")
        assert len(img) == 1
        ref = self.refs.setdefault(self.variant, img[0])
        assert np.array_equal(img[0], ref), "the valid prompt renders other pixels than at the start"
        self.valid_runs += 1
        return entry

    def check_plain(self):
        """txt2img on the checkpoint's MODEL (no AnyStory) is bit-identical to the run before any AnyStory prompt."""
        import numpy as np
        entry = self.ok(self.plain_graph())
        assert "60" not in self.cached(entry)
        img = self.images(entry, "62")[0]
        if self.plain is None:
            self.plain = img
        assert np.array_equal(img, self.plain), "the unpatched MODEL renders differently after AnyStory prompts"


@pytest.fixture(scope="module")
def rig(comfy_server, model_files, harness):
    demo = _load("anystory_demo", REPO / "scripts" / "demo.py")
    base = comfy_server.base_dir
    demo.draw_subjects(base / "input")
    bad = write_bad_files(base, model_files)
    r = Rig(comfy_server, model_files, demo, harness, bad)
    r.check_plain()          # before any AnyStory prompt of this module
    r.check_valid()          # the reference (variant False) …
    r.check_valid()          # … and True: the same pixels
    import numpy as np
    assert np.array_equal(r.refs[True], r.refs[False])
    try:
        yield r
    finally:
        for k, p in bad.items():
            if k != "marker" and Path(p).is_file():
                Path(p).unlink()


# ------------------------------------------------------------------------------------------------
# A. files: missing, renamed, truncated, corrupted, of another kind, pickled code, path traversal
# ------------------------------------------------------------------------------------------------
FILE_CASES = [
    # (case, file key or name, refnet, words the message must contain)
    ("truncated", "truncated", None, ["truncated", "re-download"]),
    ("corrupted header", "corrupt_header", None, ["corrupted", "re-download"]),
    ("corrupted data (NaN weights)", "nan_weights", None, ["NaN", "corrupted", "Re-download"]),
    ("zero bytes", "empty", None, ["0 bytes", "re-download"]),
    ("pickle renamed .safetensors", "pickle_renamed", None, ["pickle", "rename it to .bin"]),
    ("ReferenceNet in the model slot", "REFNET", None, ["ReferenceNet", "ReferenceNet slot"]),
    ("truncated ReferenceNet", "tiny_1layer", "refnet_truncated", ["ReferenceNet", "truncated", "re-download"]),
    ("SD1.5 adapter", "sd15", None, ["SD1.5", "do not fit SDXL", "ip-adapter-plus_sdxl_vit-h"]),
    ("FaceID adapter", "faceid", None, ["FaceID", "InsightFace", "ip-adapter-plus_sdxl_vit-h"]),
    ("Flux adapter", "flux_adapter", None, ["Flux", "do not fit SDXL"]),
    ("non-Plus adapter", "nonplus", None, ["non-Plus", "Plus (Resampler)"]),
    ("pickled code", "evil", None, ["refused", "could run code", "os.makedirs", "safetensors"]),
]


def _name(rig, key):
    if key == "REFNET":
        return rig.files["refnet"]
    if key == "ANYSTORY":
        return rig.files["anystory"]
    return Path(rig.bad[key]).name


@pytest.mark.parametrize("case,key,refnet,words", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_file_is_refused_with_what_and_how(rig, case, key, refnet, words):
    g = rig.probe(rig.loader(_name(rig, key), _name(rig, refnet) if refnet else "none"), out=1)
    msg = rig.fail(g, "AnyStoryModelLoader", *words)
    assert _name(rig, refnet or key) in msg, "the message does not name the file"


def test_pickled_code_never_ran(rig):
    assert not Path(rig.bad["marker"]).exists(), "the pickle's code ran"


def test_missing_and_traversal_names_are_rejected_at_validation(rig):
    """Names not in the registered folders (renamed/deleted file, '..', absolute paths) never reach the loader."""
    rig.reject(rig.probe(rig.loader("anystory_sdxl-renamed.safetensors"), out=1), "model_name", "not in list",
               "anystory_sdxl-renamed.safetensors")
    ckpt = rig.files["checkpoint"]
    rig.reject(rig.probe(rig.loader(f"../checkpoints/{ckpt}"), out=1), "model_name", "not in list")
    rig.reject(rig.probe(rig.loader(rig.files["anystory"], "/etc/passwd"), out=1), "refnet_name", "not in list")
    rig.reject(rig.probe(rig.loader("../../../../etc/hostname"), out=1), "model_name")


def test_adapter_is_not_offered_as_referencenet(rig):
    """Issue 18 point 7: refnet_name lists ReferenceNet files only, so an adapter there is refused at validation
    (the loader's own refusal of an adapter as ReferenceNet: tests/anystory/test_checkpoint.py)."""
    name = Path(rig.bad["tiny_1layer"]).name
    rig.reject(rig.probe(rig.loader(rig.files["anystory"], name), out=1), "refnet_name", "not in list", name)


def test_group_a_then_valid_prompt_renders_the_same(rig):
    rig.check_valid()


def test_names_cannot_escape_the_registered_folders(comfy, pack, server_models_dir, model_files):
    """Even called directly (no validation), paths.resolve only returns files inside models/anystory|ipadapter."""
    paths = F.pack_mod("nodes.paths")
    types_ = F.pack_mod("nodes.types")
    fp = comfy.folder_paths
    models = server_models_dir / "models"
    with model_folders(fp, {k: ([str(models / k)], paths.EXTENSIONS) for k in ("anystory", "ipadapter")}):
        assert Path(paths.resolve(model_files["anystory"])).is_file()
        ckpt = model_files["checkpoint"]
        for name in (f"../checkpoints/{ckpt}", f"../../models/checkpoints/{ckpt}", "/etc/passwd",
                     str(server_models_dir / "models" / "checkpoints" / ckpt), "..", "none", ""):
            with pytest.raises(types_.AnyStoryError) as e:
                paths.resolve(name)
            assert "'..'" in str(e.value) or "no AnyStory model file selected" in str(e.value)


# ------------------------------------------------------------------------------------------------
# B. the wrong MODEL / CLIP vision / adapter size
# ------------------------------------------------------------------------------------------------
def _unet_loader(rig, key):
    return {"class_type": "UNETLoader", "inputs": {"unet_name": Path(rig.bad[key]).name, "weight_dtype": "default"}}


def test_sd15_model_into_apply(rig):
    g = rig.probe(rig.apply(["15", 0], model=["110", 0]), out=1)
    g["110"] = _unet_loader(rig, "sd15_unet")
    rig.fail(g, "AnyStoryApply", "SDXL-family", "BaseModel", "768", "Load an SDXL checkpoint")


def test_sd15_model_into_encode(rig):
    g = rig.probe(rig.encode(["10", 0], ["11", 0], model=["110", 0], reference="shared", label="x"))
    g["110"] = _unet_loader(rig, "sd15_unet")
    rig.fail(g, "AnyStorySubjectEncode", "SDXL-family", "BaseModel")


def test_flux_model_into_apply(rig):
    g = rig.probe(rig.apply(["15", 0], model=["110", 0]), out=1)
    g["110"] = _unet_loader(rig, "flux_unet")
    rig.fail(g, "AnyStoryApply", "AnyStory SDXL model", "connected MODEL is FLUX", "AnyStory FLUX file")


def test_clip_l_instead_of_clip_h(rig):
    g = rig.probe(rig.encode(["10", 0], ["11", 0], clip=["110", 0], model=None))
    g["110"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": Path(rig.bad["clip_l"]).name}}
    rig.fail(g, "AnyStorySubjectEncode", "1024-wide", "CLIP ViT-L/14", "needs 1280", "CLIP-ViT-H-14-laion2B")


def test_adapter_for_another_unet_size(rig):
    """A loadable IP-Adapter Plus file with 1 layer on a MODEL with 7: refused at apply, naming both."""
    g = rig.probe(rig.apply(["111", 0], anystory=["110", 0]), out=1)
    g["110"] = rig.loader(Path(rig.bad["tiny_1layer"]).name)
    g["111"] = rig.encode(["10", 0], ["11", 0], anystory=["110", 0], model=None, label="the fox")
    msg = rig.fail(g, "AnyStoryApply", "cross-attention layers")
    assert "1" in msg and "7" in msg


def test_group_b_then_valid_prompt_renders_the_same(rig):
    rig.check_valid()


# ------------------------------------------------------------------------------------------------
# C. subjects and masks
# ------------------------------------------------------------------------------------------------
def test_mask_cases_render(rig):
    """Three subjects in one image: (1) an image without alpha with LoadImage's raw MASK = all black → the whole
    image, with a warning; (2) InvertMask of it = all white → the whole image, with a warning; (3) a 40×48 mask
    (LoadImageMask) for an 80×96 image → resized. The render succeeds. (Reference "off": masks of other sizes
    with references are covered in-process by test_encode.py.)"""
    import numpy as np
    g = rig.anchors()
    rgb = Path(rig.bad["rgb"]).name
    g["110"] = {"class_type": "LoadImage", "inputs": {"image": rgb}}
    g["111"] = {"class_type": "InvertMask", "inputs": {"mask": ["110", 1]}}
    g["112"] = {"class_type": "LoadImageMask", "inputs": {"image": Path(rig.bad["mask_small"]).name, "channel": "red"}}
    g["120"] = rig.encode(["110", 0], ["110", 1], label="empty mask")
    g["121"] = rig.encode(["110", 0], ["111", 0], subjects=["120", 0], label="all white")
    g["122"] = rig.encode(["110", 0], ["112", 0], subjects=["121", 0], label="small mask")
    g["130"] = rig.apply(["122", 0])
    rig.render(g, ["130", 0], "14", "rel_masks")
    entry = rig.ok(g)
    warn = {k: entry["outputs"][k]["anystory_subject"][0]["warnings"] for k in ("120", "121", "122")}
    assert any("empty (all black)" in w and "InvertMask" in w for w in warn["120"]), warn
    assert any("all white" in w and "RMBG" in w for w in warn["121"]), warn  # issue 18: never silently
    assert warn["122"] == [], warn
    assert entry["outputs"]["121"]["warnings"] == warn["121"]  # the node's text, also in /history
    assert "the subject mask is empty" in rig.srv.log_text()
    img = rig.images(entry, "14d")
    assert len(img) == 1 and img[0].shape == (64, 64, 3) and np.isfinite(img[0]).all()


def test_image_batch_is_several_views_and_bad_mask_batch_is_refused(rig):
    """An IMAGE batch of 2 = two views of one subject (tokens pooled, references concatenated): renders. An image
    batch of 3 with a mask batch of 2: refused, naming both."""
    g = rig.anchors()
    g["110"] = {"class_type": "ImageBatch", "inputs": {"image1": ["10", 0], "image2": ["13", 0]}}
    g["111"] = rig.encode(["110", 0], label="two views")
    g["130"] = rig.apply(["111", 0])
    rig.render(g, ["130", 0], "14", "rel_views")
    entry = rig.ok(g)
    assert len(rig.images(entry, "14d")) == 1

    g = rig.anchors()
    g["110"] = {"class_type": "ImageBatch", "inputs": {"image1": ["10", 0], "image2": ["13", 0]}}
    g["112"] = {"class_type": "ImageBatch", "inputs": {"image1": ["110", 0], "image2": ["10", 0]}}
    g["113"] = {"class_type": "LoadImage", "inputs": {"image": Path(rig.bad["left"]).name}}
    g["114"] = {"class_type": "LoadImage", "inputs": {"image": Path(rig.bad["right"]).name}}
    g["115"] = {"class_type": "ImageBatch", "inputs": {"image1": ["113", 0], "image2": ["114", 0]}}
    g["116"] = {"class_type": "ImageToMask", "inputs": {"image": ["115", 0], "channel": "red"}}
    g["100"] = rig.encode(["112", 0], ["116", 0], label="x")
    g["101"] = {"class_type": "PreviewAny", "inputs": {"source": ["100", 0]}}
    rig.fail(g, "AnyStorySubjectEncode", "image batch (3)", "mask batch (2)", "one mask per image")


def test_zero_subjects_is_rejected_at_validation(rig):
    node = rig.apply(["15", 0])
    del node["inputs"]["subjects"]
    rig.reject(rig.probe(node, out=1), "Required input is missing", "subjects")


def test_duplicate_subjects_render_with_a_warning(rig):
    """The same subject chained twice (same image, same settings): defined — it renders, and the log says the two
    compete for one region."""
    g = rig.anchors()
    g["111"] = rig.encode(["10", 0], ["11", 0], subjects=["12", 0], label="the fox")  # "12": the fox, encoded
    g["130"] = rig.apply(["111", 0])
    rig.render(g, ["130", 0], "14", "rel_dup")
    entry = rig.ok(g)
    assert len(rig.images(entry, "14d")) == 1
    assert "subjects 1 and 2 are the same encoded subject" in rig.srv.log_text()


def test_subjects_from_another_loader(rig):
    g = rig.probe(rig.apply(["111", 0]), out=1)   # applied with loader "3" (native)
    g["110"] = rig.loader(rig.files["ipadapter"])
    g["111"] = rig.encode(["10", 0], ["11", 0], anystory=["110", 0], label="the fox")
    rig.fail(g, "AnyStoryApply", "another AnyStory model", rig.files["ipadapter"], "same AnyStoryModelLoader")


def test_router_mode_and_mask_errors(rig):
    """Public weights (no learned router): 'router' refused; 'masks' without region_masks refused; one mask for
    two subjects refused; attention router with plain CLIPTextEncode refused when sampling; label missing from
    the prompt refused by AnyStory Text Encode."""
    g0 = rig.anchors()
    g0["110"] = rig.loader(rig.files["ipadapter"])
    g0["111"] = rig.encode(["10", 0], ["11", 0], anystory=["110", 0], label="the fox")
    g0["112"] = rig.encode(["13", 0], ["14", 0], anystory=["110", 0], subjects=["111", 0], label="the robot")

    def with_apply(**kw):
        g = dict(g0)
        g["100"] = rig.apply(["112", 0], anystory=["110", 0], **kw)
        g["101"] = {"class_type": "PreviewAny", "inputs": {"source": ["100", 1]}}
        return g

    rig.fail(with_apply(router_mode="router"), "AnyStoryApply", "router_mode 'router'", "learned", "'attention'")
    rig.fail(with_apply(router_mode="masks"), "AnyStoryApply", "'masks' needs region_masks", "one mask per subject")
    g = with_apply(router_mode="masks", region_masks=["113", 0])
    g["113"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    rig.fail(g, "AnyStoryApply", "1 mask but there are 2 subjects", "one mask per subject")
    g = with_apply(start_percent=0.8, end_percent=0.2)
    rig.fail(g, "AnyStoryApply", "start_percent (0.8)", "end_percent (0.2)", "start_percent ≤ end_percent")
    # attention router + plain CLIPTextEncode: refused when sampling, naming the node to use (the shipped
    # templates' positive prompt, node 22, is an AnyStory Text Encode: a plain one is put in here)
    g = dict(g0)
    g["132"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "the fox and the robot"}}
    g["130"] = rig.apply(["112", 0], anystory=["110", 0])
    rig.render(g, ["130", 0], "14", "rel_attn", positive=["132", 0])
    rig.fail(g, "KSampler", "AnyStory Text Encode", "region_masks")
    # label words absent from the prompt
    g = dict(g0)
    g["131"] = {"class_type": "AnyStoryTextEncode", "inputs": {"clip": ["1", 1], "subjects": ["112", 0],
                                                               "text": "a cat and a dog in a park"}}
    g["130"] = rig.apply(["112", 0], anystory=["110", 0])
    rig.render(g, ["130", 0], "14", "rel_attn", positive=["131", 0])
    rig.fail(g, "AnyStoryTextEncode", "'the fox'", "'the robot'", "do not occur in the prompt",
             "write them into the prompt")
    # reference 'native' without a ReferenceNet file: refused before any encoder runs
    g = dict(g0)
    g["100"] = rig.encode(["10", 0], ["11", 0], anystory=["110", 0], label="the fox", reference="native")
    g["101"] = {"class_type": "PreviewAny", "inputs": {"source": ["100", 0]}}
    rig.fail(g, "AnyStorySubjectEncode", "reference='native' needs a ReferenceNet file", "refnet_name")


def test_public_weights_with_masks_render(rig):
    """… and with two region masks (left/right) the same subjects render in 'masks' mode."""
    g = rig.anchors()
    g["110"] = rig.loader(rig.files["ipadapter"])
    g["111"] = rig.encode(["10", 0], ["11", 0], anystory=["110", 0], label="the fox")
    g["112"] = rig.encode(["13", 0], ["14", 0], anystory=["110", 0], subjects=["111", 0], label="the robot")
    g["113"] = {"class_type": "LoadImage", "inputs": {"image": Path(rig.bad["left"]).name}}
    g["114"] = {"class_type": "LoadImage", "inputs": {"image": Path(rig.bad["right"]).name}}
    g["115"] = {"class_type": "ImageBatch", "inputs": {"image1": ["113", 0], "image2": ["114", 0]}}
    g["116"] = {"class_type": "ImageToMask", "inputs": {"image": ["115", 0], "channel": "red"}}
    g["130"] = rig.apply(["112", 0], anystory=["110", 0], router_mode="masks", region_masks=["116", 0])
    rig.render(g, ["130", 0], "14", "rel_masks_mode")
    assert len(rig.images(rig.ok(g), "14d")) == 1


def test_group_c_then_valid_prompt_renders_the_same(rig):
    rig.check_valid()


# ------------------------------------------------------------------------------------------------
# D. sampling: odd sizes, batch, cfg 1, NaN/inf
# ------------------------------------------------------------------------------------------------
def test_odd_sizes_batch_and_cfg1_render(rig):
    """One AnyStory MODEL, four samplings in one prompt: 72×56 (odd multiples of 8), 66×50 (not multiples of 8),
    a batch of 2, cfg 1 (no negative batch)."""
    import numpy as np
    g = rig.anchors()
    g["130"] = rig.apply(["15", 0])
    rig.render(g, ["130", 0], "14", "rel_odd", width=72, height=56)
    rig.render(g, ["130", 0], "15", "rel_odd2", width=66, height=50)
    rig.render(g, ["130", 0], "16", "rel_batch", batch=2)
    rig.render(g, ["130", 0], "17", "rel_cfg1", cfg=1.0)
    entry = rig.ok(g)
    sizes = {k: [i.shape for i in rig.images(entry, k)] for k in ("14d", "15d", "16d", "17d")}
    assert sizes == {"14d": [(56, 72, 3)], "15d": [(48, 64, 3)], "16d": [(64, 64, 3)] * 2, "17d": [(64, 64, 3)]}, sizes
    two = rig.images(entry, "16d")
    assert not np.array_equal(two[0], two[1])


def test_nan_from_a_prompt_weight_is_a_clear_error(rig):
    """A prompt weight of 1e30 makes the (unpatched) model produce NaN: with AnyStory on the MODEL the prompt
    fails with a message that says so, instead of saving a black image; nothing is left behind."""
    g = rig.anchors()
    g["131"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "(the fox:1e30) and the robot"}}
    g["130"] = rig.apply(["15", 0])
    rig.render(g, ["130", 0], "14", "rel_nan", positive=["131", 0])
    rig.fail(g, "KSampler", "NaN or infinite", "prompt weight", "--force-fp32", "next prompt is not affected")


def test_group_d_then_valid_prompt_renders_the_same(rig):
    rig.check_valid()


# ------------------------------------------------------------------------------------------------
# E. a long queue, an interrupt, and the unpatched MODEL afterwards
# ------------------------------------------------------------------------------------------------
def _rss(pid: int) -> int:
    import psutil
    return psutil.Process(pid).memory_info().rss


SOAK_SAMPLERS = [("euler", "normal"), ("euler_ancestral", "karras"), ("dpmpp_2m", "karras"), ("ddim", "simple"),
                 ("heun", "normal"), ("dpmpp_sde", "sgm_uniform"), ("lms", "exponential"), ("uni_pc", "beta")]
SOAK_SIZES = [(64, 64), (72, 56), (56, 88), (80, 80), (96, 64)]


def soak_graph(rig_or_anchors, i: int) -> dict:
    """Prompt i of the CI soak: subjects [fox] / [fox, robot], router auto/router/mixed, sizes, samplers, seeds."""
    g = rig_or_anchors.anchors()
    subjects = ["12", 0] if i % 3 == 0 else ["15", 0]  # [fox] or [fox, robot]
    mode = ("auto", "router", "mixed")[i % 3]
    kw = {"router_mode": mode, "eta": (1.0, 0.6, 1.4)[i % 3], "gamma": (1.0, 0.5, 2.0)[(i // 3) % 3],
          "record_routing": bool(i % 2)}
    if mode == "mixed":  # subject 1: a mask on the left third; subject 2: an all-black mask (the router decides)
        g["116"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 96, "height": 64}}
        g["117"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}}
        g["118"] = {"class_type": "MaskComposite", "inputs": {"destination": ["116", 0], "source": ["117", 0],
                                                              "x": 0, "y": 0, "operation": "add"}}
        g["119"] = {"class_type": "MaskToImage", "inputs": {"mask": ["118", 0]}}
        g["120"] = {"class_type": "MaskToImage", "inputs": {"mask": ["116", 0]}}
        g["121"] = {"class_type": "ImageBatch", "inputs": {"image1": ["119", 0], "image2": ["120", 0]}}
        g["122"] = {"class_type": "ImageToMask", "inputs": {"image": ["121", 0], "channel": "red"}}
        kw["region_masks"] = ["122", 0]
    g["130"] = Rig.apply(subjects, **kw)
    w, h = SOAK_SIZES[i % len(SOAK_SIZES)]
    sampler, scheduler = SOAK_SAMPLERS[i % len(SOAK_SAMPLERS)]
    Rig.render(g, ["130", 0], "14", "rel_soak", width=w, height=h, steps=2 + i % 3, seed=1000 + i, sampler=sampler,
               scheduler=scheduler, cfg=(5.0, 1.0, 7.5)[i % 3])
    return g


def test_short_soak_no_failures_bounded_memory(rig):
    """25 prompts through /prompt (the CI-sized version of bench/soak.py): zero failures; the server's RSS after
    the first 5 (warm-up) grows by less than 10 % (a generous bound for so few prompts)."""
    pid = rig.srv.proc.pid
    rss = []
    failures = []
    for i in range(25):
        entry = rig.run(soak_graph(rig, i))
        err = rig.H.execution_error(entry)
        if err is not None:
            failures.append((i, err.get("node_type"), err.get("exception_message", "")[:300]))
        rss.append(_rss(pid))
    assert not failures, failures
    warm, end = rss[4], rss[-1]
    drift = (end - warm) / warm
    print(f"short soak: RSS warm-up {warm / 2**20:.0f} MiB, end {end / 2**20:.0f} MiB, drift {100 * drift:+.2f} %, "
          f"max {max(rss) / 2**20:.0f} MiB")
    assert drift < 0.10, f"RSS grew {100 * drift:.1f} % over 20 prompts after warm-up: {[r >> 20 for r in rss]}"


def test_interrupt_midway_leaves_nothing_behind(rig):
    """A long AnyStory render interrupted during sampling: the next valid prompt renders the reference pixels, and
    the checkpoint's own MODEL renders bit-identically to before any AnyStory prompt."""
    g = rig.anchors()
    g["130"] = rig.apply(["15", 0])
    rig.render(g, ["130", 0], "14", "rel_long", width=128, height=128, steps=400)
    pid = rig.srv.queue_prompt(g)
    deadline = time.monotonic() + 300
    n0 = rig.srv.log_text().count("AnyStory: 2 subject(s)")
    while time.monotonic() < deadline:   # wait until the sampler runs: the apply node logged and steps are counted
        text = rig.srv.log_text()
        tail = text.split("AnyStory: 2 subject(s)")[-1]
        if text.count("AnyStory: 2 subject(s)") > n0 and re.search(r"\s\d+/400 \[", tail):
            break
        time.sleep(0.1)
    time.sleep(0.5)
    rig.srv._request("POST", "/interrupt", {})
    deadline = time.monotonic() + 300
    entry = None
    while time.monotonic() < deadline:
        try:
            entry = rig.srv.history(pid)
        except (urllib.error.URLError, TimeoutError, OSError):
            entry = None
        if entry and (entry.get("status") or {}).get("status_str") in ("success", "error"):
            break
        time.sleep(0.2)
    assert entry is not None
    err = rig.H.execution_error(entry)
    assert err is not None and err["event"] == "execution_interrupted", err
    assert "400/400" not in rig.srv.log_text().split("AnyStory: 2 subject(s)")[-1], "it was not interrupted midway"
    rig.check_valid()
    rig.check_plain()


# ------------------------------------------------------------------------------------------------
# F. in-process: what no stock node produces
# ------------------------------------------------------------------------------------------------
def test_nan_and_inf_inputs_are_refused(env, pack):
    import torch
    img = F.subject_image()
    bad = img.clone()
    bad[0, 3, 3, 1] = float("nan")
    F.raises_pack_error(lambda: env.encode(bad), "subject image", "NaN")
    bad = img.clone()
    bad[0, 5, 5, 0] = float("inf")
    F.raises_pack_error(lambda: env.encode(bad), "subject image", "infinite")
    mask = torch.ones(1, 96, 64)
    mask[0, 10, 10] = float("nan")
    F.raises_pack_error(lambda: env.encode(img, mask=mask), "subject mask", "NaN", "disconnect the mask")
    masks = env.masks.clone()
    masks[0, 0, 0] = float("inf")
    F.raises_pack_error(lambda: env.apply(region_masks=masks), "region_masks", "NaN or infinite")
    # and afterwards everything still works, bit for bit
    lat = torch.zeros(1, 4, 16, 16)
    a = env.sample(env.apply()[0], lat, steps=2, seed=5)
    b = env.sample(env.apply()[0], lat, steps=2, seed=5)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_nine_subjects_are_refused(env, pack):
    subs = None
    for i in range(8):
        subs = env.encode(F.subject_image((0.1 * i, 0.5, 1 - 0.1 * i), seed=i), subjects=subs, label=f"s{i}",
                          reference="off")["result"][0]
    assert len(subs) == 8
    F.raises_pack_error(lambda: env.encode(F.subject_image(seed=9), subjects=subs, reference="off"),
            "at most 8 subjects", "8")
    F.raises_pack_error(lambda: subs.extended(subs.subjects[0]), "at most 8 subjects", "Split the scene")
    # 8 is fine: it samples
    import torch
    m = torch.zeros(8, 64, 64)
    for i in range(8):
        m[i, :, i * 8:(i + 1) * 8] = 1
    patched, routing = env.apply(subjects=subs, region_masks=m)
    out = env.sample(patched, torch.zeros(1, 4, 16, 16), steps=1)
    assert torch.isfinite(out).all() and routing.runs


def test_duplicate_labels_warn_with_the_attention_router(env, pack, caplog):
    import logging
    ip = F.make_anystory(env.layout, kind="ip-adapter-plus-sdxl", name="ip-plus")
    s1 = env.encode(F.subject_image(seed=1), am=ip, label="the cat", reference="off")["result"][0]
    s2 = env.encode(F.subject_image((0.2, 0.8, 0.2), seed=2), am=ip, subjects=s1, label="The Cat ",
                    reference="off")["result"][0]
    with caplog.at_level(logging.WARNING, logger="anystory"):
        env.apply(am=ip, subjects=s2, router_mode="attention", region_masks=None)
    assert "have the same label 'the cat'" in caplog.text and "own words" in caplog.text


def test_fp16_overflow_is_a_clear_error_and_leaves_nothing(harness, pack, temp_dir):
    """An fp16 model whose activations overflow: the patched sampling raises AnyStory's NaN/inf message (not a
    black image); the runtime's per-run caches are empty; a sane model then samples normally."""
    import torch
    env16 = F.build_env(harness, pack, with_subjects=False)
    env16.subjects = env16.encode(F.subject_image(), label="the cat")["result"][0]
    env16.masks = env16.masks[:1]
    hot = harness.tiny_sdxl(seed=0, dtype=torch.float16, context_dim=F.CTX)
    with torch.no_grad():  # the last convolution's weights stay representable in fp16; its outputs do not
        w = hot.model.diffusion_model.out[2].weight
        w.copy_(torch.sign(w) * 3.0e4)
    assert torch.isfinite(hot.model.diffusion_model.out[2].weight).all()
    patched, _ = env16.apply(model=hot)
    lat = torch.zeros(1, 4, 16, 16)
    with pytest.raises(F.pack_mod("nodes.types").AnyStoryError) as e:
        env16.sample(patched, lat, steps=2)
    assert "NaN or infinite" in str(e.value) and "--force-fp32" in str(e.value)
    assert F.owner_of(patched).runtime.run is None
    ok = env16.sample(env16.apply()[0], lat, steps=2)
    assert torch.isfinite(ok).all()


def test_flux_class_model_is_refused_in_process(env, comfy, pack):
    """The Flux MODEL class itself (tiny config, ComfyUI's model_base.Flux) — as the server test, without a file."""
    import torch

    import comfy.supported_models as sm
    cfg = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
           "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
           "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2}
    mc = sm.Flux(cfg)
    mc.set_inference_dtype(torch.float32, None)
    flux = comfy.model_patcher.ModelPatcher(mc.get_model({}, device=torch.device("cpu")), torch.device("cpu"),
                                            torch.device("cpu"))
    assert type(flux.model).__name__ == "Flux"
    F.raises_pack_error(lambda: env.apply(model=flux), "AnyStory SDXL model", "connected MODEL is FLUX")


def test_interrupted_sampling_leaves_no_state(env, comfy):
    """In-process: an interrupt raised from the sampler callback mid-run empties the per-run caches and ends the
    recorder's run; the same patched MODEL then samples exactly like a fresh one."""
    import torch

    import comfy.model_management as mm
    patched, routing = env.apply()
    owner = F.owner_of(patched)
    lat = torch.zeros(1, 4, 16, 16)
    fresh = env.sample(env.apply()[0], lat, steps=4, seed=2)

    def cb(step, x0, x, total):
        assert owner.runtime.run is not None, "the run caches should be live during sampling"
        if step == 1:
            raise mm.InterruptProcessingException()

    latent = comfy.sample.fix_empty_latent_channels(patched, lat)
    noise = comfy.sample.prepare_noise(latent, 2)
    with pytest.raises(mm.InterruptProcessingException):
        comfy.sample.sample(patched, noise, 4, 5.0, "euler", "normal", env.pos, env.neg, latent, callback=cb,
                            disable_pbar=True, seed=2)
    assert owner.runtime.run is None and owner._run_hw is None
    assert torch.equal(env.sample(patched, lat, steps=4, seed=2), fresh)


# ------------------------------------------------------------------------------------------------
# G. loading rules: safetensors / weights-only, no network at run time
# ------------------------------------------------------------------------------------------------
PACK_CODE = [p for d in ("anystory", "nodes") for p in sorted((REPO / d).glob("*.py"))]
NETWORK = re.compile(r"^\s*(import|from)\s+(urllib|requests|http|httpx|aiohttp|socket|huggingface_hub|ftplib|"
                     r"urllib3|websocket|smtplib)\b", re.M)


def test_pack_reads_files_only_safely_and_uses_no_network_module():
    hits = []
    for p in PACK_CODE:
        src = p.read_text()
        if p.name.startswith("train"):  # training code is not run by the nodes
            continue
        for m in NETWORK.finditer(src):
            hits.append(f"{p.relative_to(REPO)}: {m.group(0).strip()}")
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, f"{p.name}: {call}"
        assert not re.search(r"\bpickle\.loads?\(|\bdill\b|\bjoblib\b|(?<![\w.])(eval|exec)\(", src), p.name
    # may register an aiohttp route / middleware on ComfyUI's own server (no outgoing connection)
    allowed = {"nodes/live.py", "nodes/examples.py"}
    hits = [h for h in hits if h.split(":")[0] not in allowed]
    assert not hits, hits


def test_no_outgoing_connection_during_a_whole_run(env, pack, monkeypatch):
    """Encode + apply + sample with every non-loopback connection failing."""
    import socket

    import torch
    tried = []
    real = socket.socket.connect

    def guard(self, addr, *a, **k):
        host = addr[0] if isinstance(addr, tuple) else str(addr)
        if host not in ("127.0.0.1", "::1", "localhost"):
            tried.append(addr)
            raise OSError("network disabled by the test")
        return real(self, addr, *a, **k)

    def no_connection(address, *a, **k):
        tried.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "create_connection", no_connection)
    s = env.encode(F.subject_image(), label="the cat")["result"][0]
    s = env.encode(F.subject_image((0.1, 0.2, 0.9), seed=3), subjects=s, label="the dog")["result"][0]
    out = env.sample(env.apply(subjects=s)[0], torch.zeros(1, 4, 16, 16), steps=2)
    assert torch.isfinite(out).all() and not tried


def test_preview_of_a_sampling_anystory_never_acted_in(env, pack):
    """A start/end window that holds no step (found by the soak): the preview shows an empty (all background)
    grid and empty masks instead of failing the prompt with a misleading 'nothing recorded'."""
    import torch
    idle, routing = env.apply(start_percent=1.0, end_percent=1.0)
    out = env.sample(idle, torch.zeros(1, 4, 16, 16), steps=2)
    assert routing.runs == [] and routing.idle is not None
    res = F.node(pack, "AnyStoryRoutingPreview").preview(routing, {"samples": out})
    img, masks = res["result"]
    assert img.shape[0] == 1 and masks.shape == (2, 128, 128) and float(masks.abs().max()) == 0.0
    assert res["ui"]["anystory_routing_note"]
    with pytest.raises(F.pack_mod("nodes.types").AnyStoryError):  # an unrelated latent: still the clear error
        F.node(pack, "AnyStoryRoutingPreview").preview(routing, {"samples": out + 1})


def test_no_tensors_or_patches_accumulate_over_many_runs(env):
    """Allocator-independent leak check: after warm-up, 24 more apply+sample rounds (sizes, batch, samplers, modes,
    one interrupted) leave the number of live tensors and of AnyStory objects unchanged."""
    import gc
    import warnings

    import torch

    import comfy.model_management as mm

    def ours(o):
        m = type(o).__dict__.get("__module__") if isinstance(type(o).__dict__.get("__module__"), str) else ""
        return m.startswith("comfyui_anystory.")

    def live():
        gc.collect()
        objs = gc.get_objects()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n_t = sum(1 for o in objs if isinstance(o, torch.Tensor))
        return n_t, sum(1 for o in objs if ours(o))

    samplers = [("euler", "normal"), ("dpmpp_2m", "karras"), ("heun", "simple"), ("euler_ancestral", "normal")]
    shapes = [(1, 4, 16, 16), (2, 4, 9, 13), (1, 4, 12, 20)]

    def round_(i):
        patched, routing = env.apply(eta=1.0, gamma=(1.0, 0.0)[i % 2], router_mode=("masks", "router")[i % 2])
        s, sch = samplers[i % len(samplers)]
        if i % 7 == 6:  # an interrupted run
            def cb(step, *a):
                if step == 0:
                    raise mm.InterruptProcessingException()
            lat = torch.zeros(*shapes[i % 3])
            latent = comfy.sample.fix_empty_latent_channels(patched, lat)
            with pytest.raises(mm.InterruptProcessingException):
                comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, i), 2, 5.0, s, sch, env.pos, env.neg,
                                    latent, callback=cb, disable_pbar=True, seed=i)
        else:
            env.sample(patched, torch.zeros(*shapes[i % 3]), steps=2, sampler=s, scheduler=sch, seed=i,
                       cfg=(5.0, 1.0)[i % 2])
        del patched, routing

    import comfy.sample
    for i in range(7):
        round_(i)
    before = live()
    for i in range(7, 31):
        round_(i)
    after = live()
    assert before[0] > 0 and before[1] > 0  # the counts see what they count
    assert after == before, f"live (tensors, AnyStory objects) before {before}, after {after}"
