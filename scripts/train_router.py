#!/usr/bin/env python3
"""Train AnyStory on your own images: the router (stage 2, default) or the subject encoder (stage 1).

    python scripts/train_router.py --data DIR --checkpoint sd_xl_base_1.0.safetensors \\
        --clip-vision CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors \\
        --adapter ip-adapter-plus_sdxl_vit-h.safetensors --out anystory_trained.safetensors \\
        [--eval-data DIR] [--steps 2000] [--batch 1] [--lr 1e-4] [--mixed-precision bf16] [--grad-checkpointing]

    torchrun --nproc_per_node 4 scripts/train_router.py ...      # several GPUs (DDP, one process per GPU)
    python scripts/train_router.py --stage 1 ...                 # stage 1: subject encoder + ReferenceNet + W̃

Data folder: ``name.png`` + ``name_mask0.png``, ``name_mask1.png`` … (white = instance) or one
``name_labels.png`` with instance ids; optional ``name_ref<i>.png`` reference crops and ``name.txt``
captions (see ``anystory.train.scan_dataset``). Trained: the routing QFormer and the per-layer routers;
frozen: the SDXL UNet, CLIP-H, the adapter's subject QFormer and Ŵ_k/Ŵ_v. Loss: ε-MSE + λ·routing loss
(λ = 0.1; eq. 4: a sum over each layer's tokens, ``--routing-reduction mean`` for a mean) with straight-through
Gumbel-softmax maps in eq. 5. As in the paper the reference attention (eq. 6-8) is on (``--reference auto``: the
``--refnet`` ReferenceNet file, frozen, else the UNet itself as ReferenceNet; ``off`` trains without it).

Stage 1 (``--stage 1``, the paper's subject-encoder stage, same data and CLI): trained: the subject QFormer,
Ŵ_k/Ŵ_v, the reference projections W̃_k/W̃_v and the ReferenceNet (``--reference native``, the default: a
copy of the UNet without cross-attention, or the ``--refnet`` file to continue; ``shared``: the frozen UNet
serves as ReferenceNet and W̃ train; ``off``: neither); frozen: the UNet, CLIP-H, the router if the file has
one. Routing by the instance masks (no router yet), the CLIP image condition dropped for
``--condition-dropout`` (10 %) of the samples, loss = ε-MSE. Writes ``--out`` (with W̃) and the ReferenceNet
(``--refnet-out``, default ``<out>_refnet.safetensors``); no routing-IoU table (there is no router).

Writes ``--out`` (a native AnyStory file — the input's subject branch + the trained router — that
AnyStoryModelLoader loads; written at every ``--save-every`` and at the end), a resumable training
state (``--state``, default ``<out>.state.pt``; continue with ``--resume auto`` or ``--resume PATH``),
and with ``--eval-data`` a routing-IoU table per layer group (before / after training) printed at the
end and saved as ``<out>.eval.json``.

ComfyUI is imported from ``COMFYUI_PATH`` (default /opt/ComfyUI) to load the checkpoint, VAE, text
encoders and CLIP vision; the core (``anystory/``) is pure torch.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]


def core():
    """The core package ``anystory`` (registered by file location: the repo root must not be on
    sys.path, its ``nodes/`` would shadow ComfyUI's ``nodes`` module)."""
    if "anystory" not in sys.modules:
        spec = importlib.util.spec_from_file_location("anystory", REPO / "anystory" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "anystory")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["anystory"] = mod
        spec.loader.exec_module(mod)
    import anystory.checkpoint  # noqa: F401  (the attributes used below: A.train, A.checkpoint, A.layers)
    import anystory.layers  # noqa: F401
    import anystory.train  # noqa: F401
    return sys.modules["anystory"]


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    io = ap.add_argument_group("inputs and outputs")
    io.add_argument("--data", required=True, help="training folder (images + instance masks)")
    io.add_argument("--eval-data", default=None, help="held-out folder: routing IoU before/after training")
    io.add_argument("--checkpoint", help="SDXL checkpoint (.safetensors; UNet, VAE and text encoders)")
    io.add_argument("--clip-vision", help="CLIP ViT-H/14 vision model (.safetensors)")
    io.add_argument("--adapter", help="subject branch: ip-adapter-plus_sdxl_vit-h(.safetensors/.bin) or a native "
                                      "AnyStory file (its router is trained further)")
    io.add_argument("--out", required=True, help="the native AnyStory file to write (.safetensors)")
    io.add_argument("--state", default=None, help="training state file (default: <out>.state.pt)")
    io.add_argument("--resume", default=None, help="'auto' (the --state file if it exists) or a state file")
    tr = ap.add_argument_group("training")
    tr.add_argument("--stage", type=int, choices=(1, 2), default=2,
                    help="2: the router (default); 1: the subject encoder, Ŵ, W̃ and the ReferenceNet")
    tr.add_argument("--reference", choices=("auto", "native", "shared", "off"), default="auto",
                    help="the reference branch (eq. 6-8) while training; auto: stage 1 native (trains a "
                         "ReferenceNet), stage 2 native with --refnet else shared (the UNet as ReferenceNet)")
    tr.add_argument("--refnet", default=None, help="a ReferenceNet file (stage 2: frozen; stage 1: trained further)")
    tr.add_argument("--refnet-out", default=None, help="stage 1: where to write the trained ReferenceNet "
                                                     "(default <out>_refnet.safetensors)")
    tr.add_argument("--condition-dropout", type=float, default=0.1,
                    help="stage 1: share of samples whose CLIP image condition is dropped (paper: 10 %%)")
    tr.add_argument("--ref-size", type=int, default=512, help="side of the reference views the ReferenceNet sees")
    tr.add_argument("--steps", type=int, default=2000, help="optimisation steps (total, including resumed ones)")
    tr.add_argument("--batch", type=int, default=1, help="images per step per process")
    tr.add_argument("--lr", type=float, default=1e-4, help="learning rate of the routers")
    tr.add_argument("--routing-proj-lr", type=float, default=1e-5, help="learning rate of the routing QFormer")
    tr.add_argument("--weight-decay", type=float, default=0.01)
    tr.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    tr.add_argument("--routing-weight", type=float, default=0.1, help="λ of the routing loss (paper: 0.1)")
    tr.add_argument("--routing-reduction", choices=("sum", "mean"), default="sum",
                    help="the routing loss over a layer's h·w tokens: sum (eq. 4's squared norm, default) or mean "
                         "(= sum / h·w, every layer weighs alike)")
    tr.add_argument("--tau", type=float, default=1.0, help="Gumbel-softmax temperature")
    tr.add_argument("--eta", type=float, default=1.0, help="η of eq. 5 during training (the subject branch's "
                                                         "strength; 0: the router learns from the routing loss only)")
    tr.add_argument("--grad-clip", type=float, default=1.0)
    tr.add_argument("--timestep-range", default="0,1000", help="training timesteps lo,hi (hi exclusive)")
    tr.add_argument("--mixed-precision", choices=("bf16", "fp16", "no"), default="bf16",
                    help="autocast dtype; the frozen UNet is stored in it (fp32 with 'no'); trainables stay fp32")
    tr.add_argument("--grad-checkpointing", action="store_true", help="recompute UNet activations in backward")
    tr.add_argument("--router-dim", type=int, default=256)
    tr.add_argument("--router-heads", type=int, default=4)
    tr.add_argument("--resolution", type=int, default=1024, help="square training resolution (multiple of 8)")
    tr.add_argument("--max-instances", type=int, default=4)
    tr.add_argument("--caption", default="", help="prompt for images without name.txt")
    tr.add_argument("--no-augment", action="store_true", help="reference crops from the target without "
                                                              "rotation/crop/zero-padding augmentation")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    tr.add_argument("--save-every", type=int, default=500)
    tr.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32", "auto"), default="auto",
                    help="dtype of the written file (auto: the input adapter's)")
    ev = ap.add_argument_group("evaluation")
    ev.add_argument("--eval-timesteps", default="200,400,600")
    ev.add_argument("--eval-every", type=int, default=0, help="print the held-out mean IoU every N steps")
    ev.add_argument("--no-eval-baseline", action="store_true", help="skip the before-training column")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    return ap


def _ints(s: str) -> tuple:
    return tuple(int(x) for x in str(s).split(",") if x.strip())


# ------------------------------------------------------------------------------------------------
# distributed set-up (torchrun: RANK / WORLD_SIZE / LOCAL_RANK)
# ------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: object = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: Optional[str] = None) -> Dist:
    """One process per GPU under torchrun (``torch.distributed`` with NCCL on CUDA, gloo on CPU);
    a single process otherwise."""
    import torch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
        dev = torch.device("cuda", local if world > 1 or want == "cuda" else torch.device(want).index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


# ------------------------------------------------------------------------------------------------
# the frozen parts (ComfyUI loads the files)
# ------------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """What training needs besides the data: frozen UNet (on the device, in its storage dtype), the
    adapter with the router attached, the frozen encoders, the noise schedule."""

    unet: object
    adapter: object
    encoders: object
    alphas_cumprod: object
    prediction: str = "eps"
    names: dict = field(default_factory=dict)
    release_target_encoders: Callable = lambda: None   # free VAE / text encoders after encode_targets
    initial_state: Optional[dict] = None               # the router before training (baseline column)
    file_dtype: object = None                          # the input adapter's dtype (--save-dtype auto)
    frozen_state: Optional[dict] = None                # the input's untrained parts as read (written back as is)
    reference: str = "off"                             # the reference branch: off | native | shared
    refnet: object = None                              # the ReferenceNet module (reference native)


def import_comfy(device) -> None:
    root = Path(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI")).expanduser().resolve()
    if not (root / "comfy" / "model_management.py").is_file():
        raise SystemExit(f"ComfyUI not found at {root}: set COMFYUI_PATH")
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "comfy.model_management" in sys.modules:  # imported by the caller (a test, a node, a benchmark)
        return
    import comfy.cli_args
    import comfy.options  # noqa: F401
    if getattr(device, "type", str(device)) == "cpu":
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401


@dataclass
class Components:
    """The frozen models as ComfyUI objects — what the checkpoint / CLIP vision loaders return, or what a
    caller (a test, a benchmark, a node) built in memory.

    model: ``comfy.model_base.SDXL`` (or its ModelPatcher); vae: ``encode(pixels [B,H,W,3]) → latent``;
    clip_vision: ``encode_image(images, crop) → Output`` with ``penultimate_hidden_states``;
    clip: ComfyUI's CLIP (``tokenize`` / ``encode_from_tokens``) — or ``text``: a callable
    ``(captions, (H, W)) → (context [B, 77, 2048], y [B, adm] or None)`` that replaces it;
    adapter: the subject-branch file (path) or an already loaded ``AnyStoryAdapter``."""

    model: object
    vae: object
    clip_vision: object
    adapter: object
    clip: object = None
    text: Optional[Callable] = None
    names: dict = field(default_factory=dict)


def load_components(args) -> Components:
    """Load --checkpoint (UNet, VAE, text encoders) and --clip-vision through ComfyUI's own loaders."""
    import comfy.clip_vision
    import comfy.sd

    for flag in ("checkpoint", "clip_vision", "adapter"):
        if not getattr(args, flag):
            raise SystemExit(f"--{flag.replace('_', '-')} is required")
    out = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True,
                                                output_clipvision=False)
    cv = comfy.clip_vision.load(args.clip_vision)
    if cv is None:
        raise SystemExit(f"{args.clip_vision}: not a CLIP vision model ComfyUI recognises")
    return Components(model=out[0], vae=out[2], clip_vision=cv, adapter=args.adapter, clip=out[1],
                      names={"checkpoint": Path(args.checkpoint).name, "clip_vision": Path(args.clip_vision).name,
                             "adapter": Path(args.adapter).name})


def load_parts(args, dist: Dist, components: Optional[Components] = None) -> Parts:
    """The frozen parts for training from ``components`` (default: loaded from the files in ``args``):
    the UNet on the device in its storage dtype, the adapter with a fresh router (or its own, for a native
    file), the frozen encoders as :class:`anystory.train.Encoders`, the noise schedule."""
    import torch
    A = core()
    T = A.train
    import_comfy(dist.device)
    import comfy.model_base
    import comfy.model_management as mm

    log = print if dist.main else (lambda *a, **k: None)
    t0 = time.time()
    comps = components if components is not None else load_components(args)
    model = getattr(comps.model, "model", comps.model)   # a ModelPatcher → its BaseModel
    names = dict(comps.names)
    if not isinstance(model, comfy.model_base.SDXL):
        raise SystemExit(f"{names.get('checkpoint', 'the model')}: ComfyUI loads it as {type(model).__name__}, "
                         "not an SDXL-family model")
    if isinstance(comps.adapter, (str, os.PathLike)):
        names.setdefault("adapter", Path(comps.adapter).name)
        adapter = A.checkpoint.load_adapter(comps.adapter)
    else:
        adapter = comps.adapter
    names.setdefault("checkpoint", "<in memory>")
    names.setdefault("adapter", "<in memory>")
    log(f"[train] loaded {names['checkpoint']}, {names.get('clip_vision', 'CLIP vision')}, {adapter.describe()} "
        f"in {time.time() - t0:.1f} s")

    wdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[args.mixed_precision]
    unet = model.diffusion_model
    layout = A.layers.discover_layout(unet)
    adapter.check_layout(layout, names["checkpoint"])
    file_dtype = adapter.subject_proj.proj_in.weight.dtype
    trained = ("routing_proj.", "router.") if args.stage == 2 else ("subject_proj.", "ip_adapter.", "reference_proj.")
    frozen_state = {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items() if not k.startswith(trained)}
    fdtype = wdtype if dist.device.type == "cuda" else torch.float32
    initial = None
    if args.stage == 2:
        T.attach_router(adapter, router_dim=args.router_dim, router_heads=args.router_heads, seed=args.seed)
        initial = T.trainable_state(adapter)
        adapter.subject_proj.to(dist.device, fdtype)
        adapter.ip_adapter.to(dist.device, fdtype)
        if adapter.reference_proj is not None:
            adapter.reference_proj.to(dist.device, fdtype)
    else:  # stage 1: the trainer makes the subject branch (and W̃) float32 trainables; the router stays frozen
        adapter.to(dist.device)
    if adapter.has_router:
        adapter.routing_proj.to(dist.device)
        adapter.router.to(dist.device)

    sigmas = getattr(getattr(model, "model_sampling", None), "sigmas", None)
    ac = T.alphas_cumprod_from_sigmas(sigmas.detach().cpu()) if sigmas is not None else T.sdxl_alphas_cumprod()
    mtype = getattr(getattr(model, "model_type", None), "name", "EPS")
    prediction = {"EPS": "eps", "V_PREDICTION": "v"}.get(mtype)
    if prediction is None:
        raise SystemExit(f"{names['checkpoint']}: model type {mtype} is not supported (ε or v prediction only)")

    latent_format = model.latent_format
    vae, clip, cv = comps.vae, comps.clip, comps.clip_vision
    text_cache: dict = {}

    def vae_encode(images):
        return latent_format.process_in(vae.encode(images[..., :3]).float())

    def clip_text(captions, hw):
        H, W = hw
        ctx, ys = [], []
        for c in captions:
            hit = text_cache.get(c)
            if hit is None:
                cond, pooled = clip.encode_from_tokens(clip.tokenize(c), return_pooled=True)
                if cond.shape[1] > 77:
                    log(f"[train] caption longer than 77 tokens, truncated: {c[:60]!r}…")
                    cond = cond[:, :77]
                y = model.encode_adm(pooled_output=pooled, width=W, height=H, crop_w=0, crop_h=0,
                                     target_width=W, target_height=H)
                hit = (cond[0].float().cpu(), None if y is None else y[0].float().cpu())
                text_cache[c] = hit
            ctx.append(hit[0])
            ys.append(hit[1])
        return torch.stack(ctx), (None if ys[0] is None else torch.stack(ys))

    if comps.text is None and clip is None:
        raise SystemExit("no text encoder: the checkpoint has no CLIP (give a full SDXL checkpoint)")
    text_encode = comps.text if comps.text is not None else clip_text

    def clip_encode(images):
        o = cv.encode_image(images, crop=False)
        f = getattr(o, "penultimate_hidden_states", None)
        return (f if f is not None else o["penultimate_hidden_states"]).float()

    clip_pixels = None
    if getattr(cv, "model", None) is not None and getattr(cv, "patcher", None) is not None:
        def clip_pixels(pixel_values):  # encode_image's model call on normalised pixel values
            mm.load_model_gpu(cv.patcher)
            out = cv.model(pixel_values=pixel_values.to(cv.load_device).float(), intermediate_output=-2)
            return out[1].float().to(mm.intermediate_device())  # where encode_image leaves its features

    def release():
        mm.unload_all_models()
        mm.soft_empty_cache()

    unet.to(dist.device, wdtype).eval().requires_grad_(False)
    reference, refnet = reference_branch(args, unet, wdtype, dist.device, names)
    encoders = T.Encoders(clip=clip_encode, vae=vae_encode, text=text_encode, zero_image=adapter.zero_image,
                          clip_pixels=clip_pixels)
    return Parts(unet=unet, adapter=adapter, encoders=encoders,
                 alphas_cumprod=ac, prediction=prediction, initial_state=initial, release_target_encoders=release,
                 file_dtype=file_dtype, frozen_state=frozen_state, names=names, reference=reference, refnet=refnet)


def reference_branch(args, unet, wdtype, device, names: dict) -> tuple:
    """(mode, ReferenceNet module or None) of the reference branch: stage 1 native trains a ReferenceNet made
    from the UNet (or the --refnet file); stage 2 native runs the --refnet file frozen; shared uses the UNet."""
    A = core()
    mode = args.reference
    if mode == "auto":
        mode = "native" if args.stage == 1 or args.refnet else "shared"
    if mode != "native":
        return mode, None
    if args.stage == 2 and not args.refnet:
        raise SystemExit("--reference native in stage 2 needs --refnet (a trained ReferenceNet file)")
    refnet = A.train.make_refnet(unet)
    if args.refnet:
        A.train.load_refnet_weights(refnet, A.checkpoint.load_refnet(args.refnet).state_dict)
        names["refnet"] = Path(args.refnet).name
    if args.stage == 2:
        return mode, refnet.to(device, wdtype).eval().requires_grad_(False)
    return mode, refnet.to(device).requires_grad_(True)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def _state_path(args) -> Path:
    if args.state:
        return Path(args.state)
    out = Path(args.out)
    return out.with_name(out.stem + ".state.pt")


def _save_native(A, adapter, args, parts: Parts, step: int, extra: Optional[dict] = None) -> None:
    import torch
    T = A.train
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "auto": None}[args.save_dtype]
    if dtype is None:
        dtype = parts.file_dtype or adapter.subject_proj.proj_in.weight.dtype
    if args.stage == 2:
        meta = {"trained_router_steps": step, "routing_weight": args.routing_weight,
                "routing_reduction": args.routing_reduction, "router_reference_branch": parts.reference}
    else:
        meta = {"trained_encoder_steps": step, "encoder_reference_branch": parts.reference,
                "condition_dropout": args.condition_dropout}
    meta.update({"trained_on": Path(args.data).name, "subject_branch": parts.names.get("adapter", ""),
                 "zero_image": parts.encoders.zero_image, "base_checkpoint": parts.names.get("checkpoint", "")})
    meta.update(extra or {})
    exp = T.export_adapter(adapter, dtype)
    if parts.frozen_state:  # the untrained parts exactly as read (not through the bf16 copy used in training)
        exp.load_state_dict({k: v.to(dtype) for k, v in parts.frozen_state.items()}, strict=False)
    A.checkpoint.save_adapter(exp, args.out, extra_meta=meta)
    if args.stage == 1 and parts.refnet is not None:
        A.checkpoint.save_refnet({k: v.to(dtype) for k, v in T.refnet_state_dict(parts.refnet).items()},
                                 _refnet_out(args), {"trained_encoder_steps": step, "trained_on": Path(args.data).name,
                                                     "base_checkpoint": parts.names.get("checkpoint", "")})


def _refnet_out(args) -> Path:
    if args.refnet_out:
        return Path(args.refnet_out)
    out = Path(args.out)
    return out.with_name(out.stem + "_refnet.safetensors")


def _trainer(T, args, parts: Parts, cfg, device) -> tuple:
    """(trainer module, optimizer, what it trains in words) of the stage."""
    if args.stage == 1:
        trainer = T.EncoderTrainer(parts.unet, parts.adapter, cfg, alphas_cumprod=parts.alphas_cumprod,
                                   refnet=parts.refnet).to(device)
        what = "subject QFormer + Ŵ" + {"native": " + W̃ + ReferenceNet", "shared": " + W̃"}.get(parts.reference, "")
        return trainer, T.make_stage1_optimizer(trainer, cfg), what
    trainer = T.RouterTrainer(parts.unet, parts.adapter, cfg, alphas_cumprod=parts.alphas_cumprod,
                              refnet=parts.refnet).to(device)
    return trainer, T.make_optimizer(trainer, cfg), f"routing QFormer + {len(trainer.layout)} routers"


def _save_state(T, args, path, trainer, parts: Parts, optimizer, step: int, cfg, scaler) -> None:
    if args.stage == 1:
        T.save_stage1_state(path, trainer, optimizer, step, cfg, scaler)
    else:
        T.save_training_state(path, parts.adapter, optimizer, step, cfg, scaler)


def _restore_state(T, args, path, trainer, parts: Parts, optimizer, scaler) -> int:
    if args.stage == 1:
        return T.restore_stage1_state(T.load_stage1_state(path), trainer, optimizer, scaler)
    return T.restore_training_state(T.load_training_state(path), parts.adapter, optimizer, scaler)


def run(args, parts: Parts, dist: Dist) -> dict:
    """The training loop (single process or one DDP rank). Returns {"step" (reached), "start" (resumed
    from), "losses" (last step's log), "history" (every step's log of this run), "out", "state",
    "eval": {"before", "after"} as dicts or None, "eval_table", "peak_vram_gb" (CUDA: the training steps'
    peak, targets' encoding excluded)}."""
    import torch
    A = core()
    T = A.train
    main = dist.main
    log = print if main else (lambda *a, **k: None)
    device = dist.device

    train_ds = T.InstanceDataset(args.data, resolution=args.resolution, max_instances=args.max_instances,
                                 default_caption=args.caption)
    eval_ds = (T.InstanceDataset(args.eval_data, resolution=args.resolution, max_instances=args.max_instances,
                                 default_caption=args.caption) if args.eval_data else None)
    n_inst = sum(len(f.masks) for f in train_ds.files)
    log(f"[train] {len(train_ds)} training images ({n_inst} mask files), "
        f"{len(eval_ds) if eval_ds else 0} held-out; {dist.world} process(es) on {device}")

    # latents and text conditioning once (every rank: all samples; then the VAE/text encoders are freed)
    cache: dict = {}
    t0 = time.time()
    all_samples = [train_ds[i] for i in range(len(train_ds))]
    eval_samples = [eval_ds[i] for i in range(len(eval_ds))] if eval_ds else []
    for i in range(0, len(all_samples + eval_samples), 8):
        T.encode_targets((all_samples + eval_samples)[i:i + 8], parts.encoders, cache)
    parts.release_target_encoders()
    log(f"[train] encoded {len(cache)} targets (VAE latents, text) in {time.time() - t0:.1f} s")

    cfg = T.TrainConfig(lr=args.lr, routing_proj_lr=args.routing_proj_lr, weight_decay=args.weight_decay,
                        warmup_steps=args.warmup, routing_weight=args.routing_weight,
                        routing_reduction=args.routing_reduction, tau=args.tau, eta=args.eta,
                        grad_clip=args.grad_clip, mixed_precision=args.mixed_precision,
                        grad_checkpointing=bool(args.grad_checkpointing), prediction=parts.prediction,
                        timestep_range=_ints(args.timestep_range), seed=args.seed, reference=parts.reference,
                        ref_size=args.ref_size, condition_dropout=args.condition_dropout)
    trainer, optimizer, what = _trainer(T, args, parts, cfg, device)
    model = trainer
    if dist.enabled:  # stage 1: the ReferenceNet's layers after its last self-attention get no gradient
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(trainer, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=args.stage == 1)
    scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" else None
    n_train = sum(p.numel() for p in trainer.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in parts.unet.parameters()) + sum(
        p.numel() for n, p in parts.adapter.named_parameters() if not p.requires_grad)
    log(f"[train] stage {args.stage}: trainable {n_train / 1e6:.2f} M ({what}), frozen {n_frozen / 1e6:.1f} M; "
        f"reference branch {parts.reference}; {cfg.mixed_precision} autocast, grad checkpointing "
        f"{'on' if cfg.grad_checkpointing else 'off'}")

    state_path = _state_path(args)
    start = 0
    if args.resume:
        path = state_path if args.resume == "auto" else Path(args.resume)
        if path.is_file():
            start = _restore_state(T, args, path, trainer, parts, optimizer, scaler)
            log(f"[train] resumed from {path} at step {start}")
        elif args.resume != "auto":
            raise SystemExit(f"--resume {path}: no such file")
    if dist.enabled:  # every rank starts from rank 0's weights (also after a resume)
        for p in trainer.parameters():
            torch.distributed.broadcast(p.data, 0)

    batches = T.StepBatches(len(train_ds), args.batch, seed=args.seed, rank=dist.rank, world_size=dist.world)
    aug = T.AugmentConfig() if not args.no_augment else T.AugmentConfig(0, 0, 0, 0)
    bar = None
    if main and not args.no_progress and start < args.steps:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=start, desc="router" if args.stage == 2 else "encoder", unit="step",
                   dynamic_ncols=True)
    last = {}
    history = []   # per step: {"step", "loss", "diffusion", "routing", "grad_norm", "lr", "seconds"}
    ema = None
    cuda = device.type == "cuda"
    if cuda:  # the peak of the training steps (encoding the targets above is not part of it)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.time()
    for step in range(start, args.steps):
        t_step = time.perf_counter()
        torch.manual_seed(T.step_seed(args.seed, step, dist.rank))
        gen = torch.Generator().manual_seed(T.step_seed(args.seed + 1, step, dist.rank))
        samples = [all_samples[i] for i in batches.batch(step)]
        batch = T.prepare_batch(samples, parts.encoders, gen, augment=True, aug=aug, cache=cache,
                                ref_size=args.ref_size if parts.reference != "off" else None).to(device)
        model.train()
        logs = T.train_step(model, optimizer, batch, cfg, step, scaler)
        if dist.enabled:
            vec = torch.tensor([logs["loss"], logs["diffusion"], logs["routing"]], device=device)
            torch.distributed.all_reduce(vec)
            vec /= dist.world
            logs.update(loss=float(vec[0]), diffusion=float(vec[1]), routing=float(vec[2]))
        if not all(math.isfinite(logs[k]) for k in ("loss", "diffusion", "routing")):
            raise SystemExit(f"[train] non-finite loss at step {step}: {logs} (try --mixed-precision bf16 or a "
                             "lower --lr)")
        ema = dict(logs) if ema is None else {k: 0.9 * ema[k] + 0.1 * logs[k] for k in logs}
        if cuda:
            torch.cuda.synchronize(device)
        last = dict(logs, step=step + 1, seconds=time.perf_counter() - t_step)
        history.append(last)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema['loss']:.4f}", diff=f"{ema['diffusion']:.4f}", route=f"{ema['routing']:.4f}")
        elif main and (step + 1) % 10 == 0:
            print(f"[train] step {step + 1}/{args.steps} loss {ema['loss']:.4f} diffusion {ema['diffusion']:.4f} "
                  f"routing {ema['routing']:.4f}", flush=True)
        done = step + 1
        if args.save_every > 0 and done % args.save_every == 0 and done < args.steps and main:
            _save_state(T, args, state_path, trainer, parts, optimizer, done, cfg, scaler)
            _save_native(A, parts.adapter, args, parts, done)
        if args.eval_every > 0 and done % args.eval_every == 0 and eval_samples and main and args.stage == 2:
            ev = T.evaluate_routing(trainer, eval_samples, parts.encoders, _ints(args.eval_timesteps),
                                    seed=args.seed, cache=cache, device=device)
            msg = f"[eval] step {done}: routing IoU {ev.mean:.3f} ({', '.join(f'{g} {m:.3f}' for g, (m, _, _) in ev.groups.items())})"
            (bar.write if bar is not None else print)(msg)
        if dist.enabled and args.save_every > 0 and done % args.save_every == 0:
            torch.distributed.barrier()
    if bar is not None:
        bar.close()
    steps_run = args.steps - start
    peak_gb = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
    if main and steps_run > 0:
        dt = time.time() - t_start
        log(f"[train] {steps_run} steps in {dt:.1f} s ({dt / steps_run * 1000:.0f} ms/step)"
            + (f", peak VRAM {peak_gb:.2f} GB" if peak_gb is not None else ""))

    result = {"step": max(start, args.steps), "start": start, "losses": last, "history": history,
              "out": str(args.out), "state": str(state_path), "eval": None, "peak_vram_gb": peak_gb}
    if main:
        _save_state(T, args, state_path, trainer, parts, optimizer, max(start, args.steps), cfg, scaler)
        _save_native(A, parts.adapter, args, parts, max(start, args.steps))
        what = "router" if args.stage == 2 else "subject encoder"
        log(f"[train] wrote {args.out} (native AnyStory, {what} trained {max(start, args.steps)} steps) and "
            f"{state_path}" + (f"; ReferenceNet {_refnet_out(args)}" if args.stage == 1 and parts.refnet is not None else ""))
        if eval_samples and args.stage == 1:
            log("[train] stage 1 has no router: no routing-IoU table (--eval-data is used by stage 2)")
        elif eval_samples:
            ts = _ints(args.eval_timesteps)
            res = {}
            if not args.no_eval_baseline and parts.initial_state is not None:
                trained = T.trainable_state(parts.adapter)
                parts.adapter.load_state_dict(parts.initial_state, strict=False)
                res["before"] = T.evaluate_routing(trainer, eval_samples, parts.encoders, ts, seed=args.seed,
                                                   cache=cache, device=device)
                parts.adapter.load_state_dict(trained, strict=False)
            res["after"] = T.evaluate_routing(trainer, eval_samples, parts.encoders, ts, seed=args.seed,
                                              cache=cache, device=device)
            table = T.format_iou_table(res)
            print(table, flush=True)
            for k, ev in res.items():
                print(f"[eval] {k}: held-out loss {ev.loss['loss']:.4f} (diffusion {ev.loss['diffusion']:.4f}, "
                      f"routing {ev.loss['routing']:.4f})")
            result["eval"] = {k: ev.as_dict() for k, ev in res.items()}
            result["eval_table"] = table
            out = Path(args.out)
            out.with_name(out.stem + ".eval.json").write_text(json.dumps(
                {"step": result["step"], "timesteps": list(ts), "eval": result["eval"], "table": table}, indent=1))
    if dist.enabled:
        torch.distributed.barrier()
    return result


def train(argv=None, components: Optional[Components] = None) -> dict:
    """Parse ``argv``, load (or take ``components``), train; returns :func:`run`'s result on every rank."""
    args = build_parser().parse_args(argv)
    dist = setup_distributed(args.device)
    try:
        parts = load_parts(args, dist, components)
        return run(args, parts, dist)
    finally:
        import torch
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    train(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
