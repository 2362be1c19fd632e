#!/usr/bin/env python3
"""The public-weights path against IP-Adapter Plus as the original defines it, through real ComfyUI (issue 19).

    python bench/fidelity_public.py --out DIR [--pack PACK_DIR] [--label after]     # on the GPU machine

Full-shape random fp16 weights built in the process (bench/benchmark.py's ``build_models``: the SDXL UNet, VAE and
CLIP ViT-H/14; a random IP-Adapter Plus SDXL ViT-H adapter for the 70 layers), 1024², euler, 25 steps, cfg 7.5,
one seed. One subject (a square 512² image, no mask), AnyStory Apply with a full region mask, η = 1, no references
(encode reference off): with one subject everywhere this IS IP-Adapter Plus, so the pack's image should equal

- ``ipadapter``: IP-Adapter Plus written here as the original (github tencent-ailab/IP-Adapter) defines it — at
  every cross-attention layer attn2(q) + Attn(q, E·W_k^ip, E·W_v^ip), E = the Resampler of the CLIP-H penultimate
  states of the image resized to 224² (IP-Adapter's input for a square image), and for CFG's unconditional rows E
  of CLIP of ZEROS OF THE NORMALISED INPUT (``image_encoder(torch.zeros_like(clip_image))``) — an attn2 replace on
  ComfyUI's own attention, scale 1, the same adapter weights;
- ``plain``: SDXL without any adapter (the reference for "the IP-Adapter effect" = ipadapter − plain).

Reported (final latents and decoded images): ‖pack − ipadapter‖ / ‖ipadapter − plain‖ (the pack's deviation as a
share of the IP-Adapter effect) for the pack as it is (``--pack``, default this checkout) with its default
blank_image and, where the pack has the option, with blank_image = black pixels (ComfyUI_IPAdapter_plus's zero
image). Run it once with ``--pack`` = an older checkout (``--label before``) to compare. CLIP runs in fp32
(ANYSTORY_CLIP_FP32=1) so both sides see the same F_clip. Writes ``<out>/fidelity_<label>.json`` and the final
latents ``<out>/latents_<label>.safetensors``.

Device run: ComfyUI 0.3.64 and torchsde/trampoline wheels carried in ``.whl/`` as bench/flux_benchmark.py says,
then ``PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.whl/ComfyUI python3 bench/fidelity_public.py --out $OUT``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path, package_dir: Path = None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir is not None else None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--pack", default=str(REPO), help="the pack checkout to measure (default: this one)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (checks the script)")
    args = ap.parse_args(argv)
    os.environ.setdefault("ANYSTORY_CLIP_FP32", "1")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    bench = _load("anystory_bench", REPO / "bench" / "benchmark.py")
    cpu = args.quick
    bench.import_comfy(cpu=cpu)
    import torch
    from safetensors.torch import save_file

    import comfy.model_management as mm
    import comfy.sample
    from comfy.ldm.modules.attention import optimized_attention

    pack_dir = Path(args.pack).resolve()
    pack = _load("comfyui_anystory", pack_dir / "__init__.py", pack_dir)
    N = pack.NODE_CLASS_MAPPINGS
    synthetic = importlib.import_module("comfyui_anystory.anystory.synthetic")
    layers = importlib.import_module("comfyui_anystory.anystory.layers")
    types_ = importlib.import_module("comfyui_anystory.nodes.types")

    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.float16
    t0 = time.time()
    model, vae, clip_vision = bench.build_models(device, dtype, args.quick)
    layout = layers.discover_layout(model.model.diffusion_model)
    ad = synthetic.random_adapter(layout, kind="ip-adapter-plus-sdxl", seed=11).to(dtype).eval().requires_grad_(False)
    import comfy.model_patcher
    am = types_.AnyStoryModel(name="random ip-adapter-plus", adapter=ad,
                              patcher=comfy.model_patcher.ModelPatcher(ad, load_device=device,
                                                                       offload_device=torch.device("cpu")))
    print(f"[fidelity] models built in {time.time() - t0:.1f} s ({pack_dir})", flush=True)

    size = 128 if args.quick else args.size
    steps = 3 if args.quick else args.steps
    g = torch.Generator().manual_seed(5)
    img = (torch.rand(1, 8, 8, 3, generator=g) * 0.8 + 0.1).permute(0, 3, 1, 2)
    img = torch.nn.functional.interpolate(img, size=(512, 512), mode="bicubic").clamp(0, 1).permute(0, 2, 3, 1)
    img = (img + 0.05 * torch.rand(1, 512, 512, 3, generator=g)).clamp(0, 1).contiguous()
    pos, neg = bench.conds(0, size)
    latent = torch.zeros(1, 4, size // 8, size // 8)

    def sample(m):
        noise = comfy.sample.prepare_noise(latent, args.seed)
        with torch.inference_mode():
            return comfy.sample.sample(m, noise, steps, args.cfg, "euler", "normal", pos, neg, latent,
                                       disable_pbar=True, seed=args.seed).float().cpu()

    # --- IP-Adapter Plus as the original defines it -------------------------------------------------------
    with torch.inference_mode():
        mm.load_model_gpu(clip_vision.patcher)
        feats = clip_vision.encode_image(img, crop=True)["penultimate_hidden_states"]  # resize to 224² (square)
        px0 = torch.zeros(1, 3, 224, 224, device=clip_vision.load_device)
        zeros = clip_vision.model(pixel_values=px0, intermediate_output=-2)[1]   # zeros of the normalised input
        sp = ad.subject_proj.to(device)
        E_img = sp(feats.to(device, dtype))[0]
        E_unc = sp(zeros.to(device, dtype))[0]
    ad.ip_adapter.to(device)

    def ip_replace(spec):
        kv = ad.ip_adapter[str(spec.ckpt_index)]

        def fn(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            out = optimized_attention(q, k, v, heads)
            cou = extra_options.get("cond_or_uncond") or [0]
            b = q.shape[0] // len(cou)
            E = torch.cat([(E_img if c == 0 else E_unc)[None].expand(b, -1, -1) for c in cou]).to(q)
            return out + optimized_attention(q, kv.to_k_ip(E), kv.to_v_ip(E), heads)
        return fn

    ipa = model.clone()
    for spec in layout:
        ipa.set_model_attn2_replace(ip_replace(spec), spec.key[0], spec.key[1], spec.key[2])

    results = {"pack": str(pack_dir), "label": args.label, "device": torch.cuda.get_device_name(0) if not cpu else
               "cpu", "size": size, "steps": steps, "cfg": args.cfg, "seed": args.seed}
    lat = {"plain": sample(model), "ipadapter": sample(ipa)}

    # --- the pack ------------------------------------------------------------------------------------------
    enc = N["AnyStorySubjectEncode"]()
    blank_opts = None
    try:
        blank_opts = enc.INPUT_TYPES()["optional"]["blank_image"][0]
    except KeyError:
        pass
    variants = {"pack": {}}
    if blank_opts:
        variants["pack_black_pixels"] = {"blank_image": next(o for o in blank_opts if o.startswith("black"))}
    masks = torch.ones(1, size, size)
    for name, kw in variants.items():
        with torch.inference_mode():
            subjects = enc.encode(am, clip_vision, vae, img, reference="off", **kw)["result"][0]
            patched, _ = N["AnyStoryApply"]().apply(model, am, subjects, "masks", 1.0, 0.0, 0.0, 1.0,
                                                    region_masks=masks, record_routing=False)
        lat[name] = sample(patched)

    def rel(a, b):
        return float((lat[a] - lat[b]).norm() / (lat["ipadapter"] - lat["plain"]).norm())

    with torch.inference_mode():
        images = {k: vae.decode(v).float().cpu() for k, v in lat.items()}  # sample() gives process_out latents

    def rel_img(a, b):
        return float((images[a] - images[b]).norm() / (images["ipadapter"] - images["plain"]).norm())

    results["latent"] = {k: rel(k, "ipadapter") for k in lat if k.startswith("pack")}
    results["image"] = {k: rel_img(k, "ipadapter") for k in lat if k.startswith("pack")}
    results["ipadapter_effect_latent_norm"] = float((lat["ipadapter"] - lat["plain"]).norm())
    results["max_abs_image_diff_255"] = {k: float((images[k] - images["ipadapter"]).abs().max() * 255)
                                         for k in lat if k.startswith("pack")}
    print(json.dumps(results, indent=1), flush=True)
    (out_dir / f"fidelity_{args.label}.json").write_text(json.dumps(results, indent=1))
    save_file({k: v.contiguous() for k, v in lat.items()}, str(out_dir / f"latents_{args.label}.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
