"""Make the FLUX parity goldens in tests/goldens/flux/ by running the AUTHORS' AnyStory FLUX code, unmodified.

What runs
---------
The authors' repository (github junjiehe96/AnyStory, commit c38fef83a35512b2a00c072a95bc0ff56b003f93, package
``anystory/``: generate.py, transformer.py, block.py, attention_processor.py, module.py, lora_controller.py) on
TINY random-weight models that this script builds and saves to a temporary folder:

- a FLUX.1-dev-shaped ``FluxTransformer2DModel`` (2 double + 2 single blocks, 2 heads × 16, rope axes (4, 6, 6),
  joint_attention_dim 32, pooled 24, guidance embeds), a tiny 16-channel ``AutoencoderKL`` (4 levels, factor 8)
  and the flow-matching scheduler, saved as a FluxPipeline folder WITHOUT text encoders/tokenizers;
- a Redux folder: a tiny ``SiglipVisionModel`` (384 px, patch 14 → 27×27 = 729 tokens, width 32) under
  ``image_encoder/`` and a ``ReduxImageEncoder`` (redux_dim 32 → 96 → 32) under ``image_embedder/``;
- a random ``anystory_flux.bin`` in the released layout: ``{"ref": peft LoRA of the transformer (rank 4, with
  ``.alpha`` keys = 2), "redux": redux_up/redux_down LoRA (rank 128, B biases) + gate_proj, "router":
  router_embedder.* (same structure) + transformer.*.attn.processor.to_{q,k}_routing_map_lora_{A,B}.* (rank 128, B
  biases) + the router peft LoRA (rank 4, lora_B biases, no alphas)}``. The ref LoRA also targets
  ``ff.net.0.proj`` (never enabled by their code: it must have no effect).

The pipeline object is made by ``AnyStoryFluxPipeline(flux_dir, redux_dir, bin_path, ref_size=64, device=cpu,
torch_dtype=float32)`` — their constructor, loaders and ``load_anystory_model`` — and the subjects are encoded by its
own ``encode_redux_maybe_with_router_condition`` and ``encode_ref_condition``. There are no text encoders, so
instead of ``AnyStoryFluxPipeline.generate`` (which calls ``encode_prompt(prompt)``) this script calls the
module-level ``anystory.generate.generate(pipeline.flux_pipeline, ...)`` — the function that method delegates to —
with ``prompt_embeds``/``pooled_prompt_embeds`` given, and builds ``ref_mask`` exactly as the method does
(concatenation of the per-subject ``ref_masks`` along the token axis). Nothing of the authors' code is patched:
values are read with PyTorch forward hooks on modules their code calls (``norm1``/``norm1_context``/``norm`` inputs
= per-block hidden states, ``norm_out`` input, ``proj_out`` output = noise prediction, the redux embedder's inputs =
SigLIP last hidden state + token mask) and the routing maps by calling the processor's own
``calculate_routing_maps`` on the exact arguments the processor receives (forward pre-hook).

Matrix: subjects {1, 2} × router {off, on} × ref cache {off, on}; 4 steps, 128×128 px (8×8 = 64 image tokens),
guidance 3.5, redux_scale 0.6, redux steps [0.25, 0.75) → steps 1, 2; ref steps [0, 0.75) → steps 0, 1, 2 (step 3 is
plain FLUX); ref_shift 0.0 (1 subject) / 0.5 (2 subjects); enable_ref_mask on.

Versions (pip install --target, no deps): diffusers==0.32.2 peft==0.14.0 transformers==4.48.3 huggingface_hub==0.27.1
tokenizers==0.21.0 accelerate==1.2.1, with the pack's venv (torch, numpy, safetensors, PIL, regex …).

Remake
------
    PY=~/.cache/comfyui-anystory/venv/bin/python
    $PY -m pip install --target /opt/flux-ref-site --no-deps diffusers==0.32.2 peft==0.14.0 transformers==4.48.3 \\
        huggingface_hub==0.27.1 tokenizers==0.21.0 accelerate==1.2.1
    mkdir -p /opt/anystory-ref && git -C <AnyStory clone> archive c38fef83a35512b2a00c072a95bc0ff56b003f93 anystory \\
        | tar -x -C /opt/anystory-ref
    PYTHONPATH=/opt/flux-ref-site:/opt/anystory-ref $PY scripts/make_flux_goldens.py   # → tests/goldens/flux/

Outputs (fp32 safetensors unless noted): ``weights.safetensors`` (the tiny transformer in diffusers names under
``transformer.``, the Redux base weights under ``redux.``), ``anystory_flux_tiny.bin`` (the random AnyStory file,
torch pickle of tensors only), ``inputs.safetensors`` (latents, prompt embeds, SigLIP states and token masks, ref
latents/ids/masks, redux/router tokens, timesteps, sigmas), ``case_<n>s_router<0|1>_cache<0|1>.safetensors``
(per step: noise prediction, routing maps and — for the ref-cache-off runs — per-block outputs ``double<i>.img``,
``double<i>.txt`` (prompt + Redux tokens), ``single<j>.img``; ``__metadata__`` has the run settings). With the
ref cache on, their code gives bit-identical outputs here (the reference stream does not depend on the step).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "goldens" / "flux"
AUTHORS_COMMIT = "c38fef83a35512b2a00c072a95bc0ff56b003f93"

# tiny configuration (FLUX.1-dev structure)
HEADS, HEAD_DIM, AXES = 2, 16, (4, 6, 6)
HIDDEN = HEADS * HEAD_DIM
JOINT, POOLED, SIGLIP = 32, 24, 32
N_DOUBLE, N_SINGLE = 2, 2
REF_SIZE, HEIGHT, WIDTH, STEPS, TXT = 64, 128, 128, 4, 8
PEFT_RANK, PEFT_ALPHA_REF = 4, 2.0
SETTINGS = dict(redux_scale=0.6, redux_start_at=0.25, redux_end_at=0.75, ref_start_at=0.0, ref_end_at=0.75,
                guidance_scale=3.5, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH)

# where their enable_lora calls put each LoRA (diffusers module names inside a block) — used only to choose
# which modules the random LoRAs target; ff.net.0.proj is targeted but never enabled by their code
REF_TARGETS_DOUBLE = ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2",
                      "ff.net.0.proj")
ROUTER_TARGETS_DOUBLE = ("norm1_context.linear", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                         "attn.to_add_out", "ff_context.net.2")
TARGETS_SINGLE = ("norm.linear", "proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v", "proj_out")


def _randn(g, *shape, std=0.1):
    return torch.randn(*shape, generator=g) * std


def build_tiny_models(g):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.pipelines import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(1234)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=N_DOUBLE, num_single_layers=N_SINGLE, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=JOINT, pooled_projection_dim=POOLED, guidance_embeds=True,
        axes_dims_rope=AXES)
    with torch.no_grad():  # FLUX's default init leaves many zeros (gates); make every weight matter
        for name, p in transformer.named_parameters():
            if name.endswith("norm_q.weight") or "norm_k" in name or "norm_added" in name:
                p.copy_(1.0 + _randn(g, *p.shape, std=0.1))
            else:
                p.copy_(_randn(g, *p.shape, std=0.15 if p.ndim > 1 else 0.05))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    siglip = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=SIGLIP, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=384,
        patch_size=14))
    redux = ReduxImageEncoder(redux_dim=SIGLIP, txt_in_features=JOINT)
    with torch.no_grad():
        for p in redux.parameters():
            p.copy_(_randn(g, *p.shape, std=0.2))
    return transformer, vae, scheduler, siglip, redux


def _peft_lora(g, prefix, module, din, dout, rank, bias, alpha):
    out = OrderedDict()
    out[f"{prefix}{module}.lora_A.weight"] = _randn(g, rank, din, std=0.3)
    out[f"{prefix}{module}.lora_B.weight"] = _randn(g, dout, rank, std=0.3)
    if bias:
        out[f"{prefix}{module}.lora_B.bias"] = _randn(g, dout, std=0.05)
    if alpha is not None:
        out[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
    return out


def _module_shape(transformer, name):
    m = transformer.get_submodule(name)
    return m.in_features, m.out_features


def _own_lora(g, prefix, din, dout, rank):
    """An AnyStoryReduxImageEncoder / processor-style LoRA pair: A (no bias), B (bias: lora_bias=True)."""
    return OrderedDict([(f"{prefix}_A.weight", _randn(g, rank, din, std=0.1)),
                        (f"{prefix}_B.weight", _randn(g, dout, rank, std=0.1)),
                        (f"{prefix}_B.bias", _randn(g, dout, std=0.05))])


def build_anystory_file(g, transformer):
    ref = OrderedDict()
    router_lora = OrderedDict()

    def add(dest, name, bias, alpha):
        din, dout = _module_shape(transformer, name)
        dest.update(_peft_lora(g, "transformer.", name, din, dout, PEFT_RANK, bias, alpha))

    add(ref, "x_embedder", False, PEFT_ALPHA_REF)
    add(router_lora, "context_embedder", True, None)
    for i in range(N_DOUBLE):
        for t in REF_TARGETS_DOUBLE:
            add(ref, f"transformer_blocks.{i}.{t}", False, PEFT_ALPHA_REF)
        for t in ROUTER_TARGETS_DOUBLE:
            add(router_lora, f"transformer_blocks.{i}.{t}", True, None)
    for i in range(N_SINGLE):
        for t in TARGETS_SINGLE:
            add(ref, f"single_transformer_blocks.{i}.{t}", False, PEFT_ALPHA_REF)
            add(router_lora, f"single_transformer_blocks.{i}.{t}", True, None)

    def embedder_lora(prefix):
        sd = OrderedDict()
        sd.update(_own_lora(g, f"{prefix}redux_up_lora", SIGLIP, 3 * JOINT, 128))
        sd.update(_own_lora(g, f"{prefix}redux_down_lora", 3 * JOINT, JOINT, 128))
        sd[f"{prefix}gate_proj.weight"] = _randn(g, 1, JOINT, std=0.3)
        sd[f"{prefix}gate_proj.bias"] = _randn(g, 1, std=0.3)
        return sd

    router = OrderedDict()
    router.update(embedder_lora("router_embedder."))
    for kind, n in (("transformer_blocks", N_DOUBLE), ("single_transformer_blocks", N_SINGLE)):
        for i in range(n):
            for qk in ("q", "k"):
                router.update(_own_lora(g, f"transformer.{kind}.{i}.attn.processor.to_{qk}_routing_map_lora",
                                        HIDDEN, HIDDEN, 128))
    router.update(router_lora)
    return {"ref": ref, "redux": embedder_lora(""), "router": router}


def tiny_text_stack(root: Path):
    """Placeholder text encoders/tokenizers: FluxPipeline.from_pretrained (inside their init_flux_pipline) wants
    every component on disk. They are never run (prompt embeddings are given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel
    tok_dir = root / "tok"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=3, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, projection_dim=8))
    t5 = T5EncoderModel(T5Config(vocab_size=3, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    return clip, tok, t5


def save_folders(root: Path, transformer, vae, scheduler, siglip, redux):
    from diffusers import FluxPipeline
    flux_dir, redux_dir = root / "flux", root / "redux"
    clip, tok, t5 = tiny_text_stack(root)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok, transformer=transformer)
    pipe.save_pretrained(flux_dir)
    siglip.save_pretrained(redux_dir / "image_encoder")
    redux.save_pretrained(redux_dir / "image_embedder")
    return flux_dir, redux_dir


def subject_images():
    """Two subjects (RGB image, L mask; white = subject), made from a seeded generator."""
    rng = np.random.default_rng(7)
    out = []
    for k, (box, size) in enumerate((((20, 10, 80, 90), (96, 96)), ((5, 30, 70, 60), (80, 112)))):
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        out.append((Image.fromarray(arr, "RGB"), mask))
    return out


class Recorder:
    """Forward hooks on modules the authors' code calls; nothing of their code is changed."""

    def __init__(self, transformer):
        self.t = transformer
        self.step = 0
        self.rec = {}
        self.handles = []
        self.txt_len = None
        for i, blk in enumerate(transformer.transformer_blocks):
            self._first_input(blk.norm1, f"double{i}.img_in")
            self._first_input(blk.norm1_context, f"double{i}.txt_in")
            self._routing(blk.attn.processor, f"double{i}.routing")
        for i, blk in enumerate(transformer.single_transformer_blocks):
            self._first_input(blk.norm, f"single{i}.in")
            self._routing(blk.attn.processor, f"single{i}.routing")
        self._first_input(transformer.norm_out, "final.img_in")
        self.handles.append(transformer.proj_out.register_forward_hook(self._noise_pred))

    def _put(self, key, value):
        d = self.rec.setdefault(self.step, {})
        if key not in d:  # the first call of a module in a step is the image/text stream
            d[key] = value.detach().clone().float()

    def _first_input(self, module, key):
        def hook(mod, args, kwargs):
            self._put(key, args[0])
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _routing(self, proc, key):
        def hook(mod, args, kwargs):
            if kwargs.get("router_hidden_states") is None:
                return
            rmap = mod.calculate_routing_maps(
                args[0], kwargs.get("encoder_hidden_states"), kwargs["hidden_states"],
                kwargs["router_hidden_states"], kwargs["image_rotary_emb"], kwargs["router_rotary_emb"],
                kwargs["model_config"])
            self._put(key, rmap)
        self.handles.append(proc.register_forward_pre_hook(hook, with_kwargs=True))

    def _noise_pred(self, mod, args, out):
        self._put("noise_pred", out)

    def on_step_end(self, pipe, i, t, kwargs):
        self.step = i + 1
        return {}

    def remove(self):
        for h in self.handles:
            h.remove()


def block_outputs(step_rec: dict, txt_len: int) -> dict:
    """Per-block OUTPUTS from the recorded per-block INPUTS (the output of a block is the next one's input)."""
    out = {}
    for i in range(N_DOUBLE):
        if i + 1 < N_DOUBLE:
            out[f"double{i}.img"] = step_rec[f"double{i + 1}.img_in"]
            out[f"double{i}.txt"] = step_rec[f"double{i + 1}.txt_in"]
        else:
            s0 = step_rec["single0.in"]
            out[f"double{i}.txt"], out[f"double{i}.img"] = s0[:, :txt_len], s0[:, txt_len:]
    for j in range(N_SINGLE):
        if j + 1 < N_SINGLE:
            out[f"single{j}.img"] = step_rec[f"single{j + 1}.in"][:, txt_len:]
        else:
            out[f"single{j}.img"] = step_rec["final.img_in"]
    for k, v in step_rec.items():
        if k.endswith(".routing"):
            out[k] = v
    out["noise_pred"] = step_rec["noise_pred"]
    return out


def main():
    import anystory.generate as ag  # the authors' package (PYTHONPATH)
    import diffusers
    import peft
    import transformers
    print(f"diffusers {diffusers.__version__}, peft {peft.__version__}, transformers {transformers.__version__}")
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(20250117)
    transformer, vae, scheduler, siglip, redux = build_tiny_models(g)
    anystory_sd = build_anystory_file(g, transformer)
    dev = torch.device("cpu")
    tmp = Path(tempfile.mkdtemp(prefix="anystory-flux-golden-"))
    try:
        flux_dir, redux_dir = save_folders(tmp, transformer, vae, scheduler, siglip, redux)
        bin_path = tmp / "anystory_flux.bin"
        torch.save(anystory_sd, bin_path)
        pipe = ag.AnyStoryFluxPipeline(str(flux_dir), str(redux_dir), str(bin_path), ref_size=REF_SIZE, device=dev,
                                       torch_dtype=torch.float32)
        check_loaded(pipe, anystory_sd)
        run_all(ag, pipe, transformer, redux, anystory_sd, bin_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_loaded(pipe, sd):
    """Their loaders use strict=False: make sure every tensor of the file really landed where their code reads it."""
    proc = pipe.flux_pipeline.transformer.transformer_blocks[0].attn.processor
    w = sd["router"]["transformer.transformer_blocks.0.attn.processor.to_q_routing_map_lora_A.weight"]
    assert torch.equal(proc.to_q_routing_map_lora_A.weight, w), "routing-map LoRA not loaded"
    assert torch.equal(pipe.redux_embedder.gate_proj.weight, sd["redux"]["gate_proj.weight"])
    assert torch.equal(pipe.router_embedder.gate_proj.weight, sd["router"]["router_embedder.gate_proj.weight"])
    assert torch.equal(pipe.router_embedder.redux_up_lora_A.weight,
                       sd["router"]["router_embedder.redux_up_lora_A.weight"])
    lin = pipe.flux_pipeline.transformer.transformer_blocks[0].attn.to_q
    assert torch.equal(lin.lora_A["ref_lora"].weight, sd["ref"]["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"])
    assert abs(lin.scaling["ref_lora"]) == 0.0 and lin.lora_alpha["ref_lora"] == PEFT_ALPHA_REF
    assert lin.r["ref_lora"] == PEFT_RANK


def encode_subjects(pipe, subjects):
    """Their own encoders; the redux embedder's inputs (SigLIP last hidden state, 27×27 token mask) recorded."""
    seen = []
    h = pipe.redux_embedder.register_forward_pre_hook(lambda m, a: seen.append((a[0].clone(), a[1].clone())))
    enc = []
    try:
        for k, (image, mask) in enumerate(subjects):
            (redux, router) = pipe.encode_redux_maybe_with_router_condition(image, mask, enable_router=True)
            torch.manual_seed(100 + k)  # the ref VAE latent is SAMPLED (latent_dist.sample()) from the global RNG
            ref_cond, ref_masks = pipe.encode_ref_condition(image, mask)
            enc.append(dict(redux=redux, router=router, ref=ref_cond, ref_masks=ref_masks,
                            siglip=seen[-1][0], token_mask=seen[-1][1]))
    finally:
        h.remove()
    return enc


def run_all(ag, pipe, transformer_init, redux_base, anystory_sd, bin_path):
    OUT.mkdir(parents=True, exist_ok=True)
    fp = pipe.flux_pipeline
    enc = encode_subjects(pipe, subject_images())
    gen = torch.Generator().manual_seed(99)
    L = (HEIGHT // 16) * (WIDTH // 16)
    latents = torch.randn(1, L, 64, generator=gen)
    prompt_embeds = torch.randn(1, TXT, JOINT, generator=gen)
    pooled = torch.randn(1, POOLED, generator=gen)
    inputs = {"latents_packed": latents, "prompt_embeds": prompt_embeds, "pooled": pooled}
    for k, e in enumerate(enc):
        inputs[f"subject{k}.siglip"] = e["siglip"]
        inputs[f"subject{k}.token_mask"] = e["token_mask"]
        inputs[f"subject{k}.redux_tokens"] = e["redux"][0]
        inputs[f"subject{k}.router_tokens"] = e["router"][0]
        inputs[f"subject{k}.ref_latents_packed"] = e["ref"][0]
        inputs[f"subject{k}.ref_ids"] = e["ref"][1]
        inputs[f"subject{k}.ref_mask"] = e["ref_masks"]
    cases = {}
    for n in (1, 2):
        for router in (False, True):
            for cache in (False, True):
                name = f"case_{n}s_router{int(router)}_cache{int(cache)}"
                cases[name] = run_case(ag, fp, enc[:n], router, cache, latents, prompt_embeds, pooled, inputs)
                print(name, "done")
    inputs["timesteps"] = fp.scheduler.timesteps.clone().float()
    inputs["sigmas"] = fp.scheduler.sigmas.clone().float()
    # weights: the transformer as loaded by diffusers BEFORE any LoRA (the init copy), the Redux base
    wts = {f"transformer.{k}": v.contiguous() for k, v in transformer_init.state_dict().items()}
    wts.update({f"redux.{k}": v.contiguous() for k, v in redux_base.state_dict().items()})
    meta = {"authors_commit": AUTHORS_COMMIT, "config": json.dumps(dict(
        heads=HEADS, head_dim=HEAD_DIM, axes_dim=list(AXES), hidden=HIDDEN, joint_attention_dim=JOINT,
        pooled=POOLED, siglip=SIGLIP, depth=N_DOUBLE, depth_single=N_SINGLE, ref_size=REF_SIZE, txt=TXT,
        **SETTINGS))}
    save_file(wts, str(OUT / "weights.safetensors"), metadata=meta)
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(OUT / "inputs.safetensors"), metadata=meta)
    shutil.copyfile(bin_path, OUT / "anystory_flux_tiny.bin")
    for name, (tensors, md) in cases.items():
        save_file(tensors, str(OUT / f"{name}.safetensors"), metadata={k: json.dumps(v) for k, v in md.items()})
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total / 1e6:.2f} MB to {OUT}")


def run_case(ag, fp, enc, router, cache, latents, prompt_embeds, pooled, inputs):
    n = len(enc)
    ref_shift = 0.0 if n == 1 else 0.5
    redux_conditions = [e["redux"] for e in enc]
    ref_conditions = [e["ref"] for e in enc]
    router_conditions = [e["router"] for e in enc] if router else []
    ref_mask = None
    for e in enc:  # exactly AnyStoryFluxPipeline.generate (enable_ref_mask=True)
        ref_mask = e["ref_masks"] if ref_mask is None else torch.cat([ref_mask, e["ref_masks"]], dim=1)
    rec = Recorder(fp.transformer)
    try:
        out = ag.generate(
            fp, redux_conditions=redux_conditions, ref_conditions=ref_conditions, router_conditions=router_conditions,
            redux_scale=SETTINGS["redux_scale"], redux_start_at=SETTINGS["redux_start_at"],
            redux_end_at=SETTINGS["redux_end_at"], ref_shift=ref_shift, ref_mask=ref_mask,
            ref_start_at=SETTINGS["ref_start_at"], ref_end_at=SETTINGS["ref_end_at"], enable_ref_cache=cache,
            prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, latents=latents.clone(),
            height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=SETTINGS["guidance_scale"],
            output_type="latent", callback_on_step_end=rec.on_step_end).images
    finally:
        rec.remove()
        for proc in fp.transformer.attn_processors.values():  # as AnyStoryFluxPipeline.generate does after a run
            if hasattr(proc, "ref_bank"):
                proc.ref_bank = {}
    tensors = {"final_latents_packed": out.float().contiguous()}
    for step in range(STEPS):
        redux_on = int(STEPS * SETTINGS["redux_start_at"] + 0.5) <= step < int(STEPS * SETTINGS["redux_end_at"] + 0.5)
        txt_len = TXT + (81 * n if redux_on else 0)
        for k, v in block_outputs(rec.rec[step], txt_len).items():
            if cache and not (k == "noise_pred" or k.endswith(".routing")):
                continue  # the cached run's block states equal the uncached ones (checked); keep the files small
            tensors[f"step{step}.{k}"] = v.contiguous()
    md = dict(subjects=n, router=router, ref_cache=cache, ref_shift=ref_shift, enable_ref_mask=True, **SETTINGS)
    return tensors, md


if __name__ == "__main__":
    sys.exit(main())
