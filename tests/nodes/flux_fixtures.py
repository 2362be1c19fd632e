"""Helpers for the AnyStory FLUX parity tests: the tiny ComfyUI FLUX model of the goldens, the goldens' subjects,
one model call through ComfyUI's own FLUX forward (wrappers + block replaces), and a recorder of block outputs.

The goldens (tests/goldens/flux/, made by scripts/make_flux_goldens.py from the authors' code) hold the tiny
transformer in diffusers names; it is converted to ComfyUI's FLUX layout with ComfyUI's own
``comfy.model_detection.convert_diffusers_mmdit`` (which uses ``comfy.utils.flux_to_diffusers``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

GOLDEN = Path(__file__).resolve().parents[1] / "goldens" / "flux"
CASES = [f"case_{n}s_router{r}_cache{c}" for n in (1, 2) for r in (0, 1) for c in (0, 1)]


def config() -> dict:
    with safe_open(str(GOLDEN / "weights.safetensors"), "pt") as f:
        return json.loads(f.metadata()["config"])


def inputs() -> dict:
    return load_file(str(GOLDEN / "inputs.safetensors"))


def case(name: str) -> tuple[dict, dict]:
    with safe_open(str(GOLDEN / f"{name}.safetensors"), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    return load_file(str(GOLDEN / f"{name}.safetensors")), meta


def tiny_flux(comfy, dtype=torch.float32, manual_cast_dtype=None):
    """The goldens' transformer as a ComfyUI FLUX ``ModelPatcher`` (comfy.model_base.Flux, CPU); weights in
    ``dtype`` (e.g. fp8 with ``manual_cast_dtype`` as ComfyUI loads fp8 weights: cast per call)."""
    import comfy.model_detection
    cfg = config()
    unet = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
            "vec_in_dim": cfg["pooled"], "context_in_dim": cfg["joint_attention_dim"], "hidden_size": cfg["hidden"],
            "mlp_ratio": 4.0, "num_heads": cfg["heads"], "depth": cfg["depth"],
            "depth_single_blocks": cfg["depth_single"], "axes_dim": cfg["axes_dim"], "theta": 10000,
            "patch_size": 2, "qkv_bias": True}
    mc = comfy.supported_models.Flux(unet)
    mc.set_inference_dtype(dtype, manual_cast_dtype)
    model = mc.get_model({}, device=torch.device("cpu"))
    wts = load_file(str(GOLDEN / "weights.safetensors"))
    sd = {k[len("transformer."):]: v for k, v in wts.items() if k.startswith("transformer.")}
    sd = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    model.diffusion_model.to(dtype)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def redux_base() -> dict:
    wts = load_file(str(GOLDEN / "weights.safetensors"))
    return {k[len("redux."):]: v for k, v in wts.items() if k.startswith("redux.")}


def subjects(subject_cls, n: int, inp: dict, with_router: bool = True) -> list:
    cfg = config()
    s = cfg["ref_size"] // 16
    out = []
    for k in range(n):
        out.append(subject_cls(
            redux_tokens=inp[f"subject{k}.redux_tokens"], ref_tokens=inp[f"subject{k}.ref_latents_packed"],
            ref_hw=(s, s), router_tokens=inp[f"subject{k}.router_tokens"] if with_router else None,
            ref_mask=inp[f"subject{k}.ref_mask"], label=f"s{k}"))
    return out


def settings(settings_cls, meta: dict, **over):
    kw = dict(redux_scale=meta["redux_scale"], redux_start_at=meta["redux_start_at"],
              redux_end_at=meta["redux_end_at"], ref_shift=meta["ref_shift"], enable_ref_mask=meta["enable_ref_mask"],
              ref_start_at=meta["ref_start_at"], ref_end_at=meta["ref_end_at"], enable_ref_cache=meta["ref_cache"],
              enable_router=meta["router"], record_maps=True)
    kw.update(over)
    return settings_cls(**kw)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """b × (h/2·w/2) × 64 → b × 16 × h × w (inverse of FLUX's 2×2 packing)."""
    b = packed.shape[0]
    return packed.view(b, h // 2, w // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 16, h, w)


def pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def step_latents(inp: dict, golden: dict, steps: int) -> list:
    """The packed latents entering each step, from the golden noise predictions (FlowMatchEuler in fp32)."""
    x, sig = inp["latents_packed"], inp["sigmas"]
    out = [x]
    for i in range(steps - 1):
        x = (x.float() + (sig[i + 1] - sig[i]) * golden[f"step{i}.noise_pred"]).float()
        out.append(x)
    return out


class BlockRecorder:
    """Wraps every ``("double_block"|"single_block", i)`` replace of a patched MODEL to keep its outputs."""

    def __init__(self, model):
        self.out = {}
        dit = model.model_options["transformer_options"]["patches_replace"]["dit"]
        for key in list(dit):
            dit[key] = self._wrap(key, dit[key])

    def _wrap(self, key, fn):
        def replace(args, extra):
            res = fn(args, extra)
            self.out[key] = {k: v.detach().clone() for k, v in res.items()}
            return res
        return replace


def call_model(model, x, sigma: torch.Tensor, context, y, guidance, sample_sigmas):
    """One call of the FLUX diffusion model with the MODEL's transformer_options and wrappers (what a sampler's
    model call sees) → the velocity b × 16 × h × w."""
    to = dict(model.model_options["transformer_options"])
    to["wrappers"] = model.wrappers
    to["sigmas"] = sigma
    to["sample_sigmas"] = sample_sigmas
    to["cond_or_uncond"] = [0]
    with torch.no_grad():
        return model.model.diffusion_model(x, sigma, context, y=y, guidance=guidance, transformer_options=to)
