#!/usr/bin/env python3
"""Write random-weight model files where ComfyUI looks for them (for tests and the demo).

    python scripts/make_models.py --models-dir DIR [--full] [--flux] [--force] [--verify] [--only PART ...]
                                  [--public-names]

No model weights can be downloaded where this pack is built, so every file here has the real
architecture, key names and shapes, and random values (fp16 safetensors; nothing else is written):

- ``checkpoints/anystory-demo-sdxl-small.safetensors``: an SDXL-family checkpoint that ComfyUI's real
  CheckpointLoaderSimple accepts: a UNet with model_channels 320, channel_mult [1,1,1], num_res_blocks
  [1,1,1], transformer_depth [0,2,5] and no output/middle attention (ComfyUI detects it as KOALA_700M
  and builds ``model_base.SDXL``; 7 cross-attention layers, C=320), the real-size CLIP-L + CLIP-G text
  encoders and the SDXL VAE (~0.97 B parameters, ~1.8 GiB). With ``--full`` instead
  ``checkpoints/anystory-demo-sdxl-full.safetensors``: the SDXL-base UNet (70 layers; 3.5 B, ~6.9 GB).
- ``clip_vision/CLIP-ViT-H-14-random.safetensors``: CLIP ViT-H/14 vision tower (HF names) that
  ``comfy.clip_vision.load`` detects as ViT-H (penultimate hidden states [B, 257, 1280]).
- for the checkpoint's cross-attention layout (read back from its UNet weights):
  ``ipadapter/ip-adapter-plus_sdxl_vit-h-random.safetensors`` (IP-Adapter Plus SDXL ViT-H keys),
  ``anystory/anystory_sdxl-random.safetensors`` (native AnyStory adapter with router) and
  ``anystory/anystory_sdxl_refnet-random.safetensors`` (ReferenceNet initialised from that UNet).
  With ``--full`` their names end in ``-full-random`` so both sets can share a models folder.

FLUX (``--flux``, or ``parts=FLUX_PARTS``; one set, the same with ``--full``), for the FLUX workflows:

- ``diffusion_models/anystory-demo-flux-small.safetensors`` (bf16): a FLUX.1-dev transformer that ComfyUI's
  UNETLoader detects as FLUX (hidden size 3072, 24 heads, rope axes (16, 56, 56), guidance embedding, pooled 768
  — all fixed by ComfyUI's detection) with 1 double + 1 single block (0.55 B parameters, ~1.1 GB);
- ``vae/anystory-demo-flux-ae.safetensors``: the FLUX VAE architecture (16 latent channels, ``encoder.*`` /
  ``decoder.*`` like ae.safetensors, 84 M parameters);
- ``text_encoders/anystory-demo-clip_l.safetensors``: CLIP-L (HF names, 123 M). T5-XXL is not made: ComfyUI's
  loader builds it from a fixed 24-layer × 4096 config (4.7 B parameters, a 9.4 GB fp16 file, ~50 s per prompt
  on a CPU), so the demo and the server test load this CLIP-L with CLIPLoader type "sd3", ComfyUI's own
  single-text-encoder path that gives FLUX its 4096-wide context (CLIP-L's states zero-padded) and a pooled
  vector whose first 768 values FLUX reads;
- ``clip_vision/sigclip_vision_patch14_384-random.safetensors``: SigLIP so400m-384 (ComfyUI's config, 0.43 B,
  fp16), which CLIPVisionLoader detects like sigclip_vision_patch14_384.safetensors;
- ``style_models/flux1-redux-dev-random.safetensors``: FLUX.1 Redux (``redux_up`` / ``redux_down``, bf16);
- ``anystory/anystory_flux-random.bin``: the authors' file layout (a pickle of tensors only) for that 1 + 1
  block transformer (``anystory.synthetic.flux_anystory_parts``, LoRA rank 16).

Existing files are kept unless ``--force``. ComfyUI is imported from ``COMFYUI_PATH`` (default
/opt/ComfyUI) to build its modules; the core package ``anystory`` is imported by file location (the
repo root is not put on sys.path: the pack's ``nodes/`` would shadow ComfyUI's ``nodes``).
From Python: ``make_models(models_dir, full=False, force=False) -> {name: path}``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[1]

PARTS = ("checkpoint", "clip_vision", "ipadapter", "anystory", "refnet")
FLUX_PARTS = ("flux_unet", "flux_vae", "clip_l", "siglip", "redux", "anystory_flux")
FLUX_FILES = {
    "flux_unet": "diffusion_models/anystory-demo-flux-small.safetensors",
    "flux_vae": "vae/anystory-demo-flux-ae.safetensors",
    "clip_l": "text_encoders/anystory-demo-clip_l.safetensors",
    "siglip": "clip_vision/sigclip_vision_patch14_384-random.safetensors",
    "redux": "style_models/flux1-redux-dev-random.safetensors",
    "anystory_flux": "anystory/anystory_flux-random.bin",
}
FLUX_UNET = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
             "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
             "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
             "guidance_embed": True}
FLUX_VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
                     "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
UNET_PREFIX = "model.diffusion_model."

SMALL_UNET = {  # what comfy.model_detection.detect_unet_config reads back from the file
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [1, 1, 1], "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 2, 5], "transformer_depth_output": [0, 0, 0, 0, 0, 0],
    "transformer_depth_middle": -1, "use_linear_in_transformer": True, "context_dim": 2048,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
FULL_UNET = dict(SMALL_UNET, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 transformer_depth_middle=10)
SDXL_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                     "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


# The real downloads' names (what the shipped templates name), for stand-ins: link_public_names() links the
# random files under these names so a template loads and passes validation with no edit. T5-XXL is not made
# (see above): its stand-in is the CLIP-L file, enough for validation, not for running DualCLIPLoader.
PUBLIC_NAMES = {
    "checkpoint": "checkpoints/sd_xl_base_1.0.safetensors",
    "clip_vision": "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
    "ipadapter": "ipadapter/ip-adapter-plus_sdxl_vit-h.safetensors",
    "anystory": "anystory/anystory_sdxl_router.safetensors",  # stands in for a router trained by train_router.py
    "flux_unet": "diffusion_models/flux1-dev.safetensors",
    "flux_vae": "vae/ae.safetensors",
    "clip_l": "text_encoders/clip_l.safetensors",
    "t5xxl": "text_encoders/t5xxl_fp16.safetensors",
    "siglip": "clip_vision/sigclip_vision_patch14_384.safetensors",
    "redux": "style_models/flux1-redux-dev.safetensors",
    "anystory_flux": "anystory/anystory_flux.bin",
}
PUBLIC_STAND_IN = {"t5xxl": "clip_l"}


def link_public_names(files: dict, models_dir) -> dict[str, Path]:
    """Symlinks under ``models_dir`` with the real file names (PUBLIC_NAMES) to the random files ``files``
    ({part: path}, as make_models returns); parts not in ``files`` are skipped. Returns {part: link}."""
    models_dir = Path(models_dir)
    out = {}
    for part, rel in PUBLIC_NAMES.items():
        src = files.get(PUBLIC_STAND_IN.get(part, part))
        if src is None:
            continue
        dst = models_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(Path(src).resolve())
        out[part] = dst
    return out


def file_names(full: bool = False) -> dict[str, str]:
    """Relative paths (under the models dir) of the files of one set."""
    tag = "-full" if full else ""
    return {
        "checkpoint": f"checkpoints/anystory-demo-sdxl-{'full' if full else 'small'}.safetensors",
        "clip_vision": "clip_vision/CLIP-ViT-H-14-random.safetensors",
        "ipadapter": f"ipadapter/ip-adapter-plus_sdxl_vit-h{tag}-random.safetensors",
        "anystory": f"anystory/anystory_sdxl{tag}-random.safetensors",
        "refnet": f"anystory/anystory_sdxl_refnet{tag}-random.safetensors",
        **FLUX_FILES,
    }


# ------------------------------------------------------------------------------------------------
# imports
# ------------------------------------------------------------------------------------------------
def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI")).expanduser().resolve()


def import_comfy():
    """Import ComfyUI (for CPU unless it was already imported by the caller)."""
    root = str(comfyui_path())
    if not (Path(root) / "comfy" / "model_management.py").is_file():
        raise SystemExit(f"ComfyUI not found at {root}: set COMFYUI_PATH")
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != str(REPO)]
    if root not in sys.path:
        sys.path.insert(0, root)
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args
        import comfy.options  # noqa: F401
        comfy.cli_args.args.cpu = True
    import comfy.clip_vision  # noqa: F401
    import comfy.model_detection  # noqa: F401
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.supported_models
    return comfy


def import_core():
    """The core package ``anystory`` (registered by file location, as tests/conftest.py does)."""
    if "anystory" in sys.modules:
        mod = sys.modules["anystory"]
    else:
        path = REPO / "anystory"
        spec = importlib.util.spec_from_file_location("anystory", path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["anystory"] = mod
        spec.loader.exec_module(mod)
    import importlib as _il
    for sub in ("layers", "synthetic", "checkpoint"):
        _il.import_module(f"anystory.{sub}")
    return mod


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
def init_weights_(module, seed: int, std: float = 0.02, overrides: Optional[dict] = None) -> None:
    """Deterministic random init: GroupNorm/LayerNorm weight 1, bias 0; every other parameter
    N(0, std²) (``overrides``: parameter-name suffix → std). comfy.ops leaves weights uninitialised."""
    import torch
    g = torch.Generator().manual_seed(int(seed))
    overrides = overrides or {}
    with torch.no_grad():
        for mname, m in module.named_modules():
            own = list(m.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                for pn, p in own:
                    p.fill_(1.0 if pn == "weight" else 0.0)
                continue
            for pn, p in own:
                full = f"{mname}.{pn}" if mname else pn
                s = next((v for k, v in overrides.items() if full.endswith(k)), std)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(s).to(p.dtype))


def _fp16(sd: dict) -> dict:
    import torch
    out = {}
    for k, v in sd.items():
        t = v.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float16)
        out[k] = t.contiguous()
    return out


def _save(sd: dict, path: Path, meta: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        save_file(sd, str(tmp), metadata={str(k): str(v) for k, v in (meta or {}).items()})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def checkpoint_state_dict(full: bool = False, seed: int = 0) -> dict:
    """The state dict (checkpoint key names, fp16) of a random SDXL-family checkpoint.

    Keys as ComfyUI writes them (``model_base.state_dict_for_saving``): ``model.diffusion_model.*`` (UNet),
    ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, HF names),
    ``conditioner.embedders.1.model.*`` (CLIP-G, OpenCLIP names), ``first_stage_model.*`` (VAE)."""
    import torch
    import_comfy()
    from comfy import sdxl_clip, supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ucfg = dict(FULL_UNET if full else SMALL_UNET)
    model_config = (supported_models.SDXL if full else supported_models.KOALA_700M)(ucfg)
    model_config.set_inference_dtype(torch.float16, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed)

    clip = sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16)
    init_weights_(clip, seed + 1, overrides={"position_embedding.weight": 0.01})
    with torch.no_grad():
        for name, p in clip.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(4.6052)
    clip_sd = clip.state_dict()

    vae = AutoencoderKL(ddconfig=dict(SDXL_VAE_DDCONFIG), embed_dim=4).to(torch.float16)
    init_weights_(vae, seed + 2)
    vae_sd = vae.state_dict()

    sd = model.state_dict_for_saving(clip_sd, vae_sd, None)
    del model, clip, vae, clip_sd, vae_sd
    return _fp16(sd)


def clip_vision_state_dict(seed: int = 0) -> dict:
    """CLIP ViT-H/14 vision tower + projection, HF key names (``vision_model.*``, ``visual_projection.weight``)."""
    import torch
    import_comfy()
    import comfy.clip_model
    import comfy.ops
    cfg_path = comfyui_path() / "comfy" / "clip_vision_config_h.json"
    config = json.loads(cfg_path.read_text())
    m = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "cpu", comfy.ops.manual_cast)
    init_weights_(m, seed + 3, overrides={"position_embedding.weight": 0.01})
    return _fp16(m.state_dict())


def _bf16(sd: dict) -> dict:
    import torch
    return {k: (v.detach().to("cpu", torch.bfloat16) if v.is_floating_point() else v).contiguous()
            for k, v in sd.items()}


def flux_unet_state_dict(seed: int = 0, depth: int = 1, depth_single: int = 1) -> dict:
    """A FLUX.1-dev-shaped transformer (ComfyUI's names, as UNETLoader reads flux1-dev.safetensors) with
    ``depth`` double and ``depth_single`` single blocks, bf16. RMSNorm scales 1, every other weight N(0, 0.02²)."""
    import torch
    import_comfy()
    from comfy import supported_models
    mc = supported_models.Flux(dict(FLUX_UNET, depth=depth, depth_single_blocks=depth_single))
    mc.set_inference_dtype(torch.bfloat16, None)
    model = mc.get_model({}, device=torch.device("cpu"))
    dm = model.diffusion_model
    init_weights_(dm, seed)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if name.endswith(".scale"):
                p.fill_(1.0)
    sd = _bf16(dm.state_dict())
    del model, dm
    return sd


def flux_vae_state_dict(seed: int = 0) -> dict:
    """The FLUX VAE architecture (ae.safetensors: ``encoder.*`` / ``decoder.*``, 16 latent channels, no quant
    convs), bf16."""
    import_comfy()
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
    enc, dec = Encoder(**FLUX_VAE_DDCONFIG), Decoder(**FLUX_VAE_DDCONFIG)
    init_weights_(enc, seed)
    init_weights_(dec, seed + 1)
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"decoder.{k}": v for k, v in dec.state_dict().items()})
    return _bf16(sd)


def clip_l_state_dict(seed: int = 0) -> dict:
    """CLIP-L text encoder with HF names (``text_model.*``), as clip_l.safetensors, fp16."""
    import torch
    import_comfy()
    from comfy import sd1_clip
    clip = sd1_clip.SDClipModel(device="cpu", dtype=torch.float16)
    init_weights_(clip, seed, overrides={"position_embedding.weight": 0.01})
    sd = {k[len("transformer."):]: v for k, v in clip.state_dict().items() if k.startswith("transformer.")}
    return _fp16(sd)


def siglip_state_dict(seed: int = 0) -> dict:
    """SigLIP so400m-384 vision tower in ComfyUI's config (clip_vision_siglip_384.json), fp16."""
    import torch
    import_comfy()
    import comfy.clip_model
    import comfy.ops
    config = json.loads((comfyui_path() / "comfy" / "clip_vision_siglip_384.json").read_text())
    m = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "cpu", comfy.ops.manual_cast)
    init_weights_(m, seed, overrides={"position_embedding.weight": 0.01})
    return _fp16(m.state_dict())


def redux_state_dict(seed: int = 0) -> dict:
    """FLUX.1 Redux (``redux_up`` 1152 → 12288, ``redux_down`` 12288 → 4096), bf16."""
    import_comfy()
    import comfy.ldm.flux.redux
    m = comfy.ldm.flux.redux.ReduxImageEncoder()
    init_weights_(m, seed)
    return _bf16(m.state_dict())


def flux_anystory_file(path: Path, seed: int = 0, depth: int = 1, depth_single: int = 1, rank: int = 16) -> None:
    """A random anystory_flux.bin (the authors' layout: a pickle of three state dicts of tensors) for a FLUX of
    ``depth`` + ``depth_single`` blocks, written atomically."""
    import torch
    import_core()
    from anystory import synthetic
    parts = synthetic.flux_anystory_parts(depth=depth, depth_single=depth_single, rank=rank, seed=seed,
                                          dtype=torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        torch.save(parts, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


FLUX_BUILDERS = {"flux_unet": flux_unet_state_dict, "flux_vae": flux_vae_state_dict, "clip_l": clip_l_state_dict,
                 "siglip": siglip_state_dict, "redux": redux_state_dict}


def unet_state_dict_from_checkpoint(path: Path) -> dict:
    """The ``model.diffusion_model.*`` tensors of a checkpoint file (prefix kept)."""
    from safetensors import safe_open
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            if k.startswith(UNET_PREFIX):
                out[k] = f.get_tensor(k)
    return out


# ------------------------------------------------------------------------------------------------
# the CLI / API
# ------------------------------------------------------------------------------------------------
def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def make_models(models_dir, full: bool = False, force: bool = False, parts: Optional[Iterable[str]] = None,
                unet_checkpoint=None, seed: int = 0, log=print) -> dict[str, Path]:
    """Write the random model files under ``models_dir`` (ComfyUI's ``models/`` layout) and return
    ``{part: path}`` for the parts asked (default: all of :data:`PARTS`; :data:`FLUX_PARTS` are the FLUX set).

    Files that exist are kept (``force`` rewrites them). The AnyStory files are made for the layout of
    the checkpoint's UNet, read back from ``unet_checkpoint`` (default: this set's checkpoint under
    ``models_dir``, made first when missing)."""
    import torch
    models_dir = Path(models_dir).resolve()
    parts = tuple(parts or PARTS)
    bad = [p for p in parts if p not in PARTS + FLUX_PARTS]
    if bad:
        raise ValueError(f"unknown part(s) {bad}; choose from {PARTS + FLUX_PARTS}")
    names = file_names(full)
    paths = {p: models_dir / names[p] for p in PARTS + FLUX_PARTS}
    out: dict[str, Path] = {}

    def todo(part):
        return part in parts and (force or not paths[part].exists())

    written = set()

    def done(part, t0, what=""):
        written.add(part)
        log(f"[make_models] wrote {paths[part]} ({_human(paths[part].stat().st_size)}{what}) "
            f"in {time.perf_counter() - t0:.1f} s")

    ckpt = Path(unet_checkpoint).resolve() if unet_checkpoint else paths["checkpoint"]
    need_unet = any(todo(p) for p in ("ipadapter", "anystory", "refnet"))
    if todo("checkpoint") or (need_unet and not ckpt.exists() and not unet_checkpoint):
        t0 = time.perf_counter()
        sd = checkpoint_state_dict(full=full, seed=seed)
        n = sum(v.numel() for v in sd.values())
        _save(sd, paths["checkpoint"], {"anystory_synthetic": "random weights",
                                        "modelspec.architecture": "stable-diffusion-xl-v1-base"})
        del sd
        done("checkpoint", t0, f", {n / 1e6:.1f} M parameters")
        ckpt = paths["checkpoint"]
    if todo("clip_vision"):
        t0 = time.perf_counter()
        sd = clip_vision_state_dict(seed=seed)
        _save(sd, paths["clip_vision"], {"anystory_synthetic": "random weights"})
        del sd
        done("clip_vision", t0)

    if need_unet:
        import_core()
        from anystory import checkpoint as ckpt_mod
        from anystory import synthetic
        from anystory.layers import layout_from_state_dict
        unet_sd = unet_state_dict_from_checkpoint(ckpt)
        if not unet_sd:
            raise RuntimeError(f"{ckpt} has no {UNET_PREFIX}* tensors")
        layout = layout_from_state_dict(unet_sd, prefix=UNET_PREFIX)
        log(f"[make_models] layout of {ckpt.name}: {layout!r} — {layout.describe()}")
        if todo("ipadapter"):
            t0 = time.perf_counter()
            sd = synthetic.ipadapter_plus_state_dict(layout, seed=seed + 4, dtype=torch.float16)
            _save({k: v.contiguous() for k, v in sd.items()}, paths["ipadapter"])
            del sd
            done("ipadapter", t0)
        if todo("anystory"):
            t0 = time.perf_counter()
            ad = synthetic.random_adapter(layout, seed=seed + 5, dtype=torch.float16)
            paths["anystory"].parent.mkdir(parents=True, exist_ok=True)
            ckpt_mod.save_adapter(ad, paths["anystory"], extra_meta={"synthetic": "random weights",
                                                                     "unet": ckpt.name})
            del ad
            done("anystory", t0)
        if todo("refnet"):
            t0 = time.perf_counter()
            rsd = ckpt_mod.build_refnet_state_dict(unet_sd, name=str(ckpt))
            paths["refnet"].parent.mkdir(parents=True, exist_ok=True)
            ckpt_mod.save_refnet(rsd, paths["refnet"], meta={"synthetic": "initialised from " + ckpt.name})
            del rsd
            done("refnet", t0)

    for part, build in FLUX_BUILDERS.items():
        if todo(part):
            t0 = time.perf_counter()
            sd = build(seed=seed + 10 + FLUX_PARTS.index(part))
            n = sum(v.numel() for v in sd.values())
            _save(sd, paths[part], {"anystory_synthetic": "random weights"})
            del sd
            done(part, t0, f", {n / 1e6:.1f} M parameters")
    if todo("anystory_flux"):
        t0 = time.perf_counter()
        flux_anystory_file(paths["anystory_flux"], seed=seed + 20, depth=FLUX_UNET["depth"],
                           depth_single=FLUX_UNET["depth_single_blocks"])
        done("anystory_flux", t0)

    for p in parts:
        if not paths[p].exists():
            raise RuntimeError(f"{paths[p]} was not made")
        out[p] = paths[p]
        log(f"[make_models] {p:11s} {paths[p]} ({_human(paths[p].stat().st_size)}"
            f"{'' if p in written else ', existing file kept'})")
    return out


def verify(files: dict, steps: int = 2, size: int = 64, log=print) -> dict:
    """Load what was made through ComfyUI's own loaders and run it (CPU unless ComfyUI was imported
    for a GPU): checkpoint → CLIP text encode → sample ``steps`` euler steps at ``size``² → VAE decode;
    CLIP vision encode; the AnyStory files through anystory.checkpoint. Raises on NaN/inf or a bad
    detection. Returns timings and shapes."""
    import torch
    with torch.inference_mode():
        return _verify(files, steps, size, log)


def _verify(files: dict, steps: int, size: int, log) -> dict:
    import torch
    import_comfy()
    import comfy.clip_vision
    import comfy.model_detection
    import comfy.sample
    import comfy.sd
    report = {}
    if "checkpoint" in files:
        t0 = time.perf_counter()
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(files["checkpoint"]))
        report["model_config"] = type(model.model.model_config).__name__
        report["model_class"] = type(model.model).__name__
        import_core()
        from anystory.layers import discover_layout
        report["layout"] = repr(discover_layout(model.model.diffusion_model))
        report["load_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
        report["context"] = list(pos[0][0].shape)
        report["pooled"] = list(pos[0][1]["pooled_output"].shape)
        report["clip_s"] = round(time.perf_counter() - t0, 2)
        for c in (pos, neg):
            if not torch.isfinite(c[0][0]).all() or not torch.isfinite(c[0][1]["pooled_output"]).all():
                raise RuntimeError("CLIP text encoding is not finite")
        t0 = time.perf_counter()
        lat = torch.zeros(1, 4, size // 8, size // 8)
        noise = comfy.sample.prepare_noise(lat, 0)
        samples = comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", pos, neg, lat,
                                      disable_pbar=True, seed=0)
        report["sample_s"] = round(time.perf_counter() - t0, 2)
        if not torch.isfinite(samples).all():
            raise RuntimeError("sampled latent is not finite")
        t0 = time.perf_counter()
        img = vae.decode(samples)
        report["decode_s"] = round(time.perf_counter() - t0, 2)
        report["image"] = list(img.shape)
        if not torch.isfinite(img).all():
            raise RuntimeError("decoded image is not finite")
        report["image_std"] = round(float(img.float().std()), 4)
        del model, clip, vae
    if "clip_vision" in files:
        t0 = time.perf_counter()
        cv = comfy.clip_vision.load(str(files["clip_vision"]))
        if cv is None:
            raise RuntimeError(f"comfy.clip_vision.load did not recognise {files['clip_vision']}")
        out = cv.encode_image(torch.rand(1, 300, 200, 3))
        pen = out["penultimate_hidden_states"]
        report["clip_vision_penultimate"] = list(pen.shape)
        report["clip_vision_s"] = round(time.perf_counter() - t0, 2)
        if tuple(pen.shape) != (1, 257, 1280) or not torch.isfinite(pen).all():
            raise RuntimeError(f"CLIP vision output {tuple(pen.shape)} is not [1, 257, 1280] finite")
        del cv
    if any(p in files for p in FLUX_PARTS):
        report.update(_verify_flux(files, size))
    if any(p in files for p in ("anystory", "ipadapter", "refnet")):
        import_core()
        from anystory import checkpoint as ckpt_mod
        for p in ("ipadapter", "anystory"):
            if p in files:
                ad = ckpt_mod.load_adapter(files[p])
                report[p] = ad.describe()
        if "refnet" in files:
            r = ckpt_mod.load_refnet(files["refnet"])
            report["refnet"] = f"in_channels {r.in_channels}, {len(r.layout())} layers"
    log("[make_models] verify: " + json.dumps(report))
    return report


def _verify_flux(files: dict, size: int) -> dict:
    """The FLUX set through ComfyUI's loaders: UNETLoader's, CLIPLoader's (type sd3), VAELoader's, CLIPVisionLoader's
    and StyleModelLoader's functions, one euler step at ``size``² (cfg 1, FLUX guidance), the AnyStory file."""
    import torch

    import comfy.clip_vision
    import comfy.sample
    import comfy.sd
    import comfy.utils
    report = {}
    if "flux_unet" in files:
        t0 = time.perf_counter()
        model = comfy.sd.load_diffusion_model(str(files["flux_unet"]))
        report["flux_model"] = type(model.model).__name__
        dm = model.model.diffusion_model
        report["flux_blocks"] = [len(dm.double_blocks), len(dm.single_blocks)]
        cond = [[torch.randn(1, 77, 4096) * 0.1, {"pooled_output": torch.randn(1, 2048) * 0.1, "guidance": 3.5}]]
        if "clip_l" in files:
            clip = comfy.sd.load_clip([str(files["clip_l"])], clip_type=comfy.sd.CLIPType.SD3)
            cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
            report["flux_context"] = list(cond[0][0].shape)
        lat = torch.zeros(1, 16, size // 8, size // 8)
        out = comfy.sample.sample(model, comfy.sample.prepare_noise(lat, 0), 1, 1.0, "euler", "simple", cond, cond,
                                  lat, disable_pbar=True, seed=0)
        if not torch.isfinite(out).all():
            raise RuntimeError("the FLUX model's sample is not finite")
        report["flux_sample_s"] = round(time.perf_counter() - t0, 2)
        del model
    if "flux_vae" in files:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files["flux_vae"])))
        lat = vae.encode(torch.rand(1, size, size, 3))
        report["flux_vae_latent"] = list(lat.shape)
        if lat.shape[1] != 16 or not torch.isfinite(lat).all():
            raise RuntimeError(f"the FLUX VAE gave {tuple(lat.shape)}")
    if "siglip" in files:
        cv = comfy.clip_vision.load(str(files["siglip"]))
        out = cv.encode_image(torch.rand(1, 384, 384, 3), crop=False)
        report["siglip_last_hidden"] = list(out["last_hidden_state"].shape)
    if "redux" in files:
        sm = comfy.sd.load_style_model(str(files["redux"]))
        report["redux"] = type(sm.model).__name__
    if "anystory_flux" in files:
        import_core()
        from anystory.flux.checkpoint import load_flux_checkpoint
        report["anystory_flux"] = load_flux_checkpoint(str(files["anystory_flux"])).describe()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", required=True, help="ComfyUI models folder to write into")
    ap.add_argument("--full", action="store_true", help="full SDXL-base-shaped checkpoint (3.5 B parameters, ~6.9 GB)")
    ap.add_argument("--force", action="store_true", help="rewrite files that exist")
    ap.add_argument("--only", nargs="+", choices=PARTS + FLUX_PARTS, help="make only these parts")
    ap.add_argument("--flux", action="store_true", help="the FLUX set (FLUX_PARTS) instead of the SDXL one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--public-names", action="store_true",
                    help="also link the files under the real downloads' names (PUBLIC_NAMES): the shipped templates "
                         "then load with no edit")
    ap.add_argument("--verify", action="store_true",
                    help="afterwards load the files through ComfyUI's loaders and run a 2-step 64x64 txt2img "
                         "+ a CLIP vision encode (CPU)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    parts = a.only or (FLUX_PARTS if a.flux else None)
    files = make_models(a.models_dir, full=a.full, force=a.force, parts=parts, seed=a.seed)
    if a.public_names:
        for part, link in link_public_names(files, a.models_dir).items():
            print(f"[make_models] {part:11s} {link} -> {link.resolve().name}")
    print(f"[make_models] done in {time.perf_counter() - t0:.1f} s")
    if a.verify:
        verify(files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
