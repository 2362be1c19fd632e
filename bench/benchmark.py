#!/usr/bin/env python3
"""AnyStory sampling cost against plain SDXL and regional IP-Adapter — one run, one table.

    python bench/benchmark.py --out bench/results            # on the GPU machine (full SDXL, 1024², 25 steps)
    python bench/benchmark.py --quick --device cpu           # a smoke run of the script itself

Everything is built in this process with random fp16 weights of the real shapes (never loaded from
disk): the SDXL UNet, the SDXL VAE, CLIP ViT-H/14, and AnyStory / IP-Adapter Plus adapters for the
UNet's 70 cross-attention layers. Sampling goes through real ComfyUI (``comfy.sample.sample``,
euler, cfg 7.5). Per configuration it reports ms per step (the median step-to-step interval), the
ratio to plain SDXL (each sampling right after a plain one; the median of those pairs' ratios), the
subject encode time per subject, and peak VRAM during sampling (and its overhead over plain).
``--allocator comfyui`` runs on the CUDA allocator backend that ComfyUI's ``main.py`` picks on most CUDA
builds (cudaMallocAsync); by default the process keeps whatever PYTORCH_CUDA_ALLOC_CONF says.

Configurations: plain; AnyStory on public weights (IP-Adapter Plus tokens, shared-UNet ReferenceNet,
attention router) with 1/2/4 subjects; native AnyStory (random adapter with router, native random
ReferenceNet) with 1/2/4 subjects; regional IP-Adapter Plus through this pack (region masks, no router,
no references) with 1/2/4 subjects; and IPAdapter_plus itself (regional, attn masks) when it is
installed in ComfyUI's custom_nodes. ``--negative-rows both`` measures every configuration with reference
features twice: with AnyStory Apply's default negative rows (background only: no references there) and with
``negative_rows`` = "same references as positive" (the CFG negative rows routed and attending to the
references too); the second row's note gives its cost as the ratio of the two rows' × plain.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
QUICK_UNET = dict(FULL_UNET, model_channels=64, num_res_blocks=[1, 1, 1], transformer_depth=[0, 1, 1],
                  transformer_depth_output=[0, 0, 1, 1, 1, 1], transformer_depth_middle=1)
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


# ------------------------------------------------------------------------------------------------
def import_comfy(cpu: bool):
    root = Path(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI")).resolve()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    sys.path.insert(0, str(root))
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401
    return root


def load_pack():
    name = "comfyui_anystory"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def init_(module, seed: int, std: float = 0.02):
    import torch
    gens = {}

    def gen(device):
        if str(device) not in gens:
            gens[str(device)] = torch.Generator(device=device).manual_seed(seed)
        return gens[str(device)]

    with torch.no_grad():
        for name, m in module.named_modules():
            own = list(m.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) or "norm" in type(m).__name__.lower():
                for pn, p in own:
                    p.fill_(1.0 if pn == "weight" else 0.0)
                continue
            for pn, p in own:
                s = 0.01 if "position_embedding" in pn or "position_embedding" in name else std
                p.copy_(torch.randn(p.shape, generator=gen(p.device), device=p.device, dtype=torch.float32).mul_(s).to(p.dtype))


def build_models(device, dtype, quick: bool):
    import torch

    import comfy.clip_model
    import comfy.clip_vision
    import comfy.model_patcher
    import comfy.ops
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    cfg = comfy.supported_models.SDXL(dict(QUICK_UNET if quick else FULL_UNET))
    if quick:
        cfg.unet_config["num_head_channels"] = 16
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, device=device)
    init_(model.diffusion_model, 0)
    model.diffusion_model.to(dtype)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))

    vae_m = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4).to(device)
    init_(vae_m, 2)
    vae = comfy.sd.VAE(sd={k: v.to(dtype) for k, v in vae_m.state_dict().items()})
    del vae_m

    cvcfg = json.loads((Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json").read_text())
    cv = comfy.clip_model.CLIPVisionModelProjection(cvcfg, dtype, device, comfy.ops.manual_cast)
    init_(cv, 3)
    clip_vision = comfy.clip_vision.load_clipvision_from_sd({k: v for k, v in cv.state_dict().items()})
    del cv
    return patcher, vae, clip_vision


def make_anystory(pack, patcher, kind: str, device, dtype, with_refnet: bool):
    import torch

    import comfy.model_patcher
    layers = importlib.import_module("comfyui_anystory.anystory.layers")
    synthetic = importlib.import_module("comfyui_anystory.anystory.synthetic")
    checkpoint = importlib.import_module("comfyui_anystory.anystory.checkpoint")
    types = importlib.import_module("comfyui_anystory.nodes.types")
    layout = layers.discover_layout(patcher.model.diffusion_model)
    ad = synthetic.random_adapter(layout, kind=kind).to(dtype).eval().requires_grad_(False)
    ap = comfy.model_patcher.ModelPatcher(ad, load_device=device, offload_device=torch.device("cpu"))
    refnet = None
    if with_refnet:
        unet_sd = {k: v for k, v in patcher.model.diffusion_model.state_dict().items()}
        sd = checkpoint.build_refnet_state_dict(unet_sd)
        sd["input_blocks.0.0.weight"] = sd["input_blocks.0.0.weight"].clone()
        refnet = checkpoint.RefNetWeights(sd, 5, {})
    return types.AnyStoryModel(name=f"random {kind}", adapter=ad, patcher=ap, refnet=refnet,
                               refnet_name="random refnet" if refnet is not None else None)


def subject_image(i: int, size: int = 512):
    import torch
    g = torch.Generator().manual_seed(100 + i)
    img = torch.rand(1, size, size, 3, generator=g) * 0.3 + torch.tensor([0.8 * (i % 2), 0.5, 0.8 * (i % 3 == 0)])
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = (((yy - size * 0.55) ** 2 + (xx - size * 0.5) ** 2) < (size * 0.38) ** 2).float()[None]
    return img.clamp(0, 1), mask


def region_masks(n: int, h: int, w: int):
    import torch
    m = torch.zeros(n, h, w)
    for i in range(n):
        m[i, :, i * w // n:(i + 1) * w // n] = 1.0
    return m


def conds(n_labels: int, size: int):
    import torch
    g = torch.Generator().manual_seed(7)
    pos = {"pooled_output": torch.randn(1, 1280, generator=g), "width": size, "height": size}
    if n_labels:
        pos["anystory_labels"] = {f"subject {i + 1}": [2 + 3 * i, 3 + 3 * i] for i in range(n_labels)}
    neg = {"pooled_output": torch.randn(1, 1280, generator=g), "width": size, "height": size}
    return [[torch.randn(1, 77, 2048, generator=g), pos]], [[torch.randn(1, 77, 2048, generator=g), neg]]


class Bench:
    def __init__(self, args):
        import torch
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if self.cuda else torch.float32
        import_comfy(cpu=not self.cuda)
        self.pack = load_pack()
        self.N = self.pack.NODE_CLASS_MAPPINGS
        t = time.time()
        self.model, self.vae, self.clip_vision = build_models(self.device, self.dtype, args.quick)
        print(f"[bench] models built in {time.time() - t:.1f} s on {self.device}", flush=True)
        self.size = args.size
        self.latent = torch.zeros(1, 4, self.size // 8, self.size // 8)
        self.results = []
        self.plain_runs = []  # ms/step of every plain sampling measured beside a configuration
        self.last_plain = []  # those of the last configuration

    def sync(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize()

    def sample(self, model, pos, neg, steps: int, seed: int = 1, callback=None):
        import comfy.sample
        noise = comfy.sample.prepare_noise(self.latent, seed)
        return comfy.sample.sample(model, noise, steps, self.args.cfg, "euler", "normal", pos, neg, self.latent,
                                   disable_pbar=True, seed=seed, callback=callback)

    def unload_aux(self):
        """Unload what encoding left loaded (CLIP vision, VAE, a native ReferenceNet): sampling does not
        use them, so the peak below is what sampling itself needs."""
        import comfy.model_management as mm
        keep = []
        for lm in list(mm.current_loaded_models):
            inner = getattr(getattr(lm, "model", None), "model", None)
            if type(inner).__name__ in ("CLIPVisionModelProjection", "AutoencoderKL", "UNetModel", "AnyStoryAdapter"):
                lm.model_unload()
            else:
                keep.append(lm)
        mm.current_loaded_models[:] = keep
        mm.soft_empty_cache()

    def _timed_sampling(self, model, pos, neg):
        """(ms per step, total s) of one sampling: ms per step is the median of its step-to-step intervals
        (sampler callback, host clock) without the first two steps — robust against the VM's hiccups,
        which a difference of two totals is not."""
        stamps = []
        self.sync()
        t0 = time.perf_counter()
        self.sample(model, pos, neg, self.args.steps, callback=lambda *a: stamps.append(time.perf_counter()))
        self.sync()
        total = time.perf_counter() - t0
        diffs = [b - a for a, b in zip(stamps[2:], stamps[3:])]
        return (statistics.median(diffs) * 1000 if diffs else total / self.args.steps * 1000), total

    def time_sampling(self, model, pos, neg, against_plain: bool = True):
        """(ms per step, ratio to plain, total s, peak VRAM GB). The host-bound speed of the VM drifts by
        tens of percent within minutes, so each of the ``repeats`` samplings of this configuration follows
        a plain sampling, and the ratio is the median of the ratios of these adjacent pairs."""
        import torch
        self.unload_aux()
        self.sample(model, pos, neg, 2)  # warm-up (loads, allocator, caches)
        pos0, neg0 = conds(0, self.size)
        ms_runs, ratios, totals, plains = [], [], [], []
        peak = 0.0
        for _ in range(self.args.repeats):
            plain = self._timed_sampling(self.model, pos0, neg0)[0] if against_plain else None
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            ms, total = self._timed_sampling(model, pos, neg)
            if self.cuda:
                peak = max(peak, torch.cuda.max_memory_allocated() / 2 ** 30)
            ms_runs.append(ms)
            totals.append(total)
            if plain:
                ratios.append(ms / plain)
                plains.append(plain)
        ratio = statistics.median(ratios) if ratios else 1.0
        self.plain_runs += plains
        self.last_plain = plains
        return statistics.median(ms_runs), ratio, statistics.median(totals), peak

    def encode(self, am, n: int, reference: str, labels: bool):
        enc = self.N["AnyStorySubjectEncode"]()
        subjects, times = None, []
        for i in range(n):
            img, mask = subject_image(i)
            self.sync(); t0 = time.perf_counter()
            out = enc.encode(am, self.clip_vision, self.vae, img, mask=mask,
                             model=self.model if reference == "shared" else None, subjects=subjects,
                             label=f"subject {i + 1}" if labels else "", reference=reference)
            self.sync()
            times.append((time.perf_counter() - t0) * 1000)
            subjects = out["result"][0]
        return subjects, times

    def encode_timing(self, am, reference: str):
        """Median ms per subject over repeated encodes (after a warm-up encode)."""
        self.encode(am, 1, reference, True)
        _, times = self.encode(am, 4, reference, True)
        return statistics.median(times)

    def settle(self, what: str):
        """Free what the last configuration left and log what stays allocated (leak check)."""
        import gc

        import torch

        import comfy.model_management as mm
        gc.collect()
        mm.cleanup_models()
        if self.cuda:
            torch.cuda.empty_cache()
            alloc = torch.cuda.memory_allocated() / 2 ** 30
            loaded = [(type(m.model.model).__name__, round(m.model_loaded_memory() / 2 ** 30, 2))
                      for m in mm.current_loaded_models]
            print(f"[bench] after {what}: {alloc:.2f} GB allocated; loaded {loaded}", flush=True)

    def record(self, name, n, ms, ratio, total, peak, enc_ms=None, note=""):
        row = {"name": name, "subjects": n, "ms_per_step": round(ms, 2), "ratio_to_plain": round(ratio, 3),
               "encode_ms_per_subject": None if enc_ms is None else round(enc_ms, 1),
               "peak_vram_gb": round(peak, 3), "total_s": round(total, 2), "note": note}
        if self.results:
            row["plain_ms_per_step_beside"] = round(statistics.median(self.last_plain), 2) if self.last_plain else None
            row["vram_overhead_gb"] = round(peak - self.results[0]["peak_vram_gb"], 3)
        self.results.append(row)
        print(f"[bench] {name:34s} {ms:8.2f} ms/step  x{row['ratio_to_plain']:.3f}  "
              f"enc {row['encode_ms_per_subject']} ms  peak {peak:.2f} GB", flush=True)

    def run(self):
        import torch
        args = self.args
        pos0, neg0 = conds(0, self.size)
        ms, _, total, peak = self.time_sampling(self.model, pos0, neg0, against_plain=False)
        self.record("plain SDXL", 0, ms, 1.0, total, peak)
        self.settle("plain")
        counts = [int(c) for c in args.subjects.split(",")]
        groups = [g for g in args.configs.split(",")]
        for group in groups:
            if group in CONFIGS:
                cfg = CONFIGS[group]
                am = self.make(cfg["kind"], refnet=cfg["refnet"])
                enc_ms = self.encode_timing(am, cfg["reference"])
                modes = NEGATIVE_MODES[args.negative_rows] if cfg["reference"] != "off" else [None]
                for n in counts:
                    base = None  # × plain of the default negative rows, for the alternative's note
                    for neg_rows in modes:
                        kw = {} if neg_rows is None else {"negative_rows": neg_rows}
                        m, pos, neg = _patched(self, group, n, am=am, **kw)
                        ms, ratio, total, peak = self.time_sampling(m, pos, neg)
                        note = graph_stats(m)
                        if neg_rows is None:
                            base = ratio
                        elif base:
                            note += f"; x{ratio / base:.3f} the default negative rows (ratio of the × plain)"
                        name = cfg["name"] + ("" if neg_rows is None else f" [negative rows: {neg_rows}]")
                        self.record(name, n, ms, ratio, total, peak, enc_ms, note=note)
                        del m
                        self.settle(f"{group} {n} {neg_rows or ''}")
                if cfg["refnet"]:
                    am.refnet = None
                    am._refnet_module = None
            elif group == "ipadapter_plus":
                try:
                    self.run_ipadapter_plus(counts, pos0, neg0)
                except Exception as e:  # third-party code: report, keep the rest of the table
                    print(f"[bench] IPAdapter_plus failed: {type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache() if self.cuda else None

    def make(self, kind, refnet):
        return make_anystory(self.pack, self.model, kind, self.device, self.dtype, refnet)

    def run_ipadapter_plus(self, counts, pos, neg):
        """cubiq/ComfyUI_IPAdapter_plus itself (regional: one IPAdapterAdvanced per subject with attn_mask)."""
        import torch
        root = Path(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI")) / "custom_nodes"
        cand = [p for p in root.glob("*IPAdapter*plus*") if (p / "IPAdapterPlus.py").is_file()]
        if not cand:
            print("[bench] IPAdapter_plus not installed in custom_nodes: skipped", flush=True)
            return
        spec = importlib.util.spec_from_file_location("ipadapter_plus_pkg", cand[0] / "__init__.py",
                                                      submodule_search_locations=[str(cand[0])])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ipadapter_plus_pkg"] = mod
        spec.loader.exec_module(mod)
        ipp = sys.modules["ipadapter_plus_pkg.IPAdapterPlus"]
        synthetic = importlib.import_module("comfyui_anystory.anystory.synthetic")
        layers = importlib.import_module("comfyui_anystory.anystory.layers")
        sd = synthetic.ipadapter_plus_state_dict(layers.discover_layout(self.model.model.diffusion_model))
        ipadapter = {"image_proj": {}, "ip_adapter": {}}
        for k, v in sd.items():
            a, b = k.split(".", 1)
            ipadapter[a][b] = v
        node = ipp.IPAdapterAdvanced()
        for n in counts:
            m = self.model
            masks = region_masks(n, self.size, self.size)
            for i in range(n):
                img, _ = subject_image(i, 224)
                m = node.apply_ipadapter(m, ipadapter, start_at=0.0, end_at=1.0, weight=1.0, weight_style=1.0,
                                         weight_composition=1.0, expand_style=False, weight_type="linear",
                                         combine_embeds="concat", weight_faceidv2=None, image=img,
                                         image_style=None, image_composition=None, image_negative=None,
                                         clip_vision=self.clip_vision, attn_mask=masks[i:i + 1], insightface=None,
                                         embeds_scaling="V only", layer_weights=None, ipadapter_params=None,
                                         encode_batch_size=0, style_boost=None, composition_boost=None,
                                         enhance_tiles=1, enhance_ratio=1.0, weight_kolors=1.0)[0]
            self.record("IPAdapter_plus itself (regional)", n, *self.time_sampling(m, pos, neg))
            del m
            self.settle(f"IPAdapter_plus {n}")
        torch.cuda.empty_cache() if self.cuda else None


def profile(b: Bench, group: str, n: int, out_dir: Path):
    """torch.profiler over three steady sampler steps of one configuration: top CUDA and CPU ops."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    m, pos, neg = _patched(b, "plain" if group == "encode" else group, n)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    if group == "encode":
        am = b.make("ip-adapter-plus-sdxl", refnet=False)
        b.encode(am, 1, "shared", True)
        with tprofile(activities=acts, record_shapes=False) as prof:
            b.encode(am, n, "shared", True)
            b.sync()
    else:
        # steady steps: the profiler records sampler steps 3-5 of a 6-step run (after the run's set-up
        # and, on CUDA, the capture of the hook graphs in step 1), stepped by the sampler's callback
        from torch.profiler import schedule
        b.sample(m, pos, neg, 2)
        with tprofile(activities=acts, record_shapes=False, schedule=schedule(wait=2, warmup=1, active=3)) as prof:
            b.sample(m, pos, neg, 6, callback=lambda *a: prof.step())
            b.sync()
    key = "cuda_time_total" if b.cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print(table)
    print(cpu_table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile_{group}_{n}.txt").write_text(table + "\n\n" + cpu_table)


NEGATIVE_SAME = "same references as positive"  # AnyStoryApply's negative_rows alternative (its default: None here)
NEGATIVE_MODES = {"background": [None], "same": [NEGATIVE_SAME], "both": [None, NEGATIVE_SAME]}

CONFIGS = {  # group → adapter, reference mode, whether subjects carry labels, AnyStoryApply inputs
    "public": dict(name="anystory public (shared, attention)", kind="ip-adapter-plus-sdxl", refnet=False,
                   reference="shared", labels=True, apply=dict(router_mode="attention")),
    "native": dict(name="anystory native (refnet, router)", kind="anystory-sdxl", refnet=True,
                   reference="native", labels=False, apply=dict(router_mode="router")),
    "regional": dict(name="regional IP-Adapter Plus (this pack)", kind="ip-adapter-plus-sdxl", refnet=False,
                     reference="off", labels=False, apply=dict(router_mode="masks", gamma=0.0), masks=True),
}


def _patched(b: Bench, group: str, n: int, am=None, **kw):
    """(model, pos, neg) of one configuration (``am``: its AnyStory model, made here when None); ``kw``
    overrides AnyStoryApply's inputs."""
    if group == "plain":
        pos, neg = conds(0, b.size)
        return b.model, pos, neg
    cfg = CONFIGS[group]
    if am is None:
        am = b.make(cfg["kind"], refnet=cfg["refnet"])
    subjects, _ = b.encode(am, n, cfg["reference"], cfg["labels"])
    pos, neg = conds(n if cfg["labels"] else 0, b.size)
    args = dict(cfg["apply"])
    if cfg.get("masks"):
        args["region_masks"] = region_masks(n, b.size, b.size)
    graphs = kw.pop("cuda_graphs", True)
    args.update(kw)
    with _environ({"ANYSTORY_CUDA_GRAPHS": "1" if graphs else "0"}):  # read when the patch is made
        m, _ = b.N["AnyStoryApply"]().apply(b.model, am, subjects, **args)
    return m, pos, neg


@contextlib.contextmanager
def _environ(values: dict):
    """Environment variables set for the duration of the block, then restored (or removed)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def graph_stats(model) -> str:
    """How the patch's hook bodies ran in the last sampling: replayed from CUDA graphs, captured, eager."""
    g = _graphs_of(model)
    if g is not None:
        return "graphs " + ("on" if g.enabled and not g._failed else "off") + " " + \
            ", ".join(f"{k} {v}" for k, v in g.stats.items())
    return ""


def _graphs_of(model):
    reps = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for r in reps.values():
        g = getattr(getattr(getattr(r, "owner", None), "runtime", None), "graphs", None)
        if g is not None:
            return g
    return None


def graphs_report(b: Bench, group: str, n: int, out_dir: Path) -> str:
    """How the hook bodies ran step by step in one full sampling (after a warm-up one): replayed from a
    CUDA graph, captured, or eager — a slot whose inputs move every step keeps capturing variants and then
    runs from its staged variant, which copies its inputs first."""
    m, pos, neg = _patched(b, group, n)
    b.sample(m, pos, neg, 2)
    g = _graphs_of(m)
    if g is None:
        return ""
    rows = []
    last = [dict(g.stats)]
    slots = staged = 0

    def step(*_):
        nonlocal slots, staged
        now = dict(g.stats)
        rows.append({k: now[k] - last[0].get(k, 0) for k in now})
        last[0] = now
        slots = len(g._slots)  # the run's end drops them
        staged = sum(1 for ent in g._slots.values() for v in ent[1] if v[4] is not None)

    b.sync()
    b.sample(m, pos, neg, b.args.steps, callback=step)
    b.sync()
    lines = [f"{group} {n}: hook bodies per step (replay / capture / eager), {slots} slots, {staged} on a staged variant"]
    lines += [f"  step {i:2d}  {r['replay']:5d} {r['capture']:5d} {r['eager']:5d}" for i, r in enumerate(rows)]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"graphs_{group}_{n}.txt").write_text(text)
    return text


ABLATIONS = [  # (label, AnyStoryApply overrides, environment while sampling): the patch with parts switched off
    ("full", {}, {}),
    ("full, without CUDA graphs (eager hook bodies)", dict(cuda_graphs=False), {}),
    ("full, σ read back from the device every step", {}, {"ANYSTORY_STEP_SYNC": "1"}),
    ("hooks installed, never active (start=end=100 %)", dict(start_percent=1.0, end_percent=1.0), {}),
    ("no routing record", dict(record_routing=False), {}),
    ("routing + eq. 5 only (γ = 0)", dict(gamma=0.0), {}),
    ("routing + eq. 6-8 only (η = 0)", dict(eta=0.0), {}),
    ("routing only (η = γ = 0)", dict(eta=0.0, gamma=0.0), {}),
    ("negative rows with the same references as positive", dict(negative_rows=NEGATIVE_SAME), {}),
]


def ablate(b: Bench, group: str, n: int, out_dir: Path) -> str:
    """ms/step of one configuration with its parts switched off one by one, against plain, in one run."""
    lines = [f"ablation of {group} with {n} subject(s): ms/step, × plain (median ratio to the plain sampling run "
             "just before each measured sampling)"]
    for label, kw, env in [("plain SDXL itself (the noise floor of the ratio)", None, {})] + ABLATIONS:
        m, pos, neg = _patched(b, "plain", 0) if kw is None else _patched(b, group, n, **kw)
        with _environ(env):
            ms, ratio, _, peak = b.time_sampling(m, pos, neg)
        lines.append(f"  {label:52s} {ms:8.2f}  x{ratio:.3f}  peak {peak:.2f} GB  {graph_stats(m)}")
        print(lines[-1], flush=True)
        del m
        b.settle(label)
    pl = b.plain_runs[-(len(ABLATIONS) + 1) * b.args.repeats:]
    lines.append(f"  plain SDXL during the ablation: median {statistics.median(pl):.2f} ms/step, "
                 f"min {min(pl):.2f}, max {max(pl):.2f}")
    text = "\n".join(lines)
    print(text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"ablation_{group}_{n}.txt").write_text(text + "\n")
    return text


def host_profile(b: Bench, group: str, n: int, out_dir: Path, steps: int = 10) -> str:
    """cProfile (host time per Python function) of a few sampling steps: where the host time goes."""
    import cProfile
    import io
    import pstats
    m, pos, neg = _patched(b, group, n)
    b.sample(m, pos, neg, 2)
    b.sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    b.sample(m, pos, neg, steps)
    b.sync()
    prof.disable()
    wall = (time.perf_counter() - t0) * 1000
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    buf.write(f"{group} {n}: {steps} steps in {wall:.1f} ms under cProfile\n")
    st.sort_stats("tottime").print_stats(40)
    st.sort_stats("cumulative").print_stats(60)
    text = buf.getvalue()
    print(text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"host_{group}_{n}.txt").write_text(text)
    return text


def sync_report(b: Bench, group: str, n: int, out_dir: Path, steps: int = 4) -> str:
    """Every host↔device synchronisation during a sampling (torch.cuda sync debug mode), by step and by the
    innermost frames of this pack / ComfyUI that caused it: a sync inside a step stalls the host-bound
    pipeline, one in the run's set-up costs once."""
    import collections
    import traceback
    import warnings

    import torch
    if not b.cuda:
        print("[bench] sync report needs CUDA: skipped", flush=True)
        return ""
    m, pos, neg = _patched(b, group, n)
    b.sample(m, pos, neg, 2)
    b.sync()
    step = {"i": -1}
    hits = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if ("comfyui_anystory" in f.filename or "/anystory/" in f.filename or "/nodes/" in f.filename
                      or "/comfy/" in f.filename)]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno}({f.name})" for f in frames[-3:][::-1]) or filename
        hits[("step 0" if step["i"] < 0 else "steps 1+", where)] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters on exit
            warnings.simplefilter("always")
            warnings.showwarning = show
            b.sample(m, pos, neg, steps, callback=lambda i, *a: step.__setitem__("i", i))
            b.sync()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    lines = [f"host-device syncs of {group} with {n} subject(s), one sampling of {steps} steps (step 0 includes the "
             "run's set-up):"]
    for (phase, where), c in sorted(hits.items(), key=lambda x: (x[0][0], -x[1])):
        lines.append(f"  {phase:9s} {c:5d}  {where}")
    text = "\n".join(lines)
    print(text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"syncs_{group}_{n}.txt").write_text(text + "\n")
    return text


def encode_breakdown(b: Bench, n: int, out_dir: Path, reference: str = "shared") -> str:
    """Wall ms (synchronised) of each stage of one subject encode, median over ``n`` encodes after a warm-up:
    the stage functions of the pack's encode/refnet modules are wrapped for the measurement only."""
    import contextlib
    import sys
    enc_mod = sys.modules[type(b.N["AnyStorySubjectEncode"]()).__module__]
    nodes_pkg = enc_mod.__name__.rsplit(".", 1)[0]
    ref_mod = importlib.import_module(nodes_pkg + ".refnet")
    sdxl_mod = importlib.import_module(nodes_pkg + ".sdxl")  # the SDXL family's encode: its stage functions
    graphs_mod = importlib.import_module(nodes_pkg.rsplit(".", 1)[0] + ".anystory.fast.graphs")
    import comfy.model_management as mm
    times: dict = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            b.sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                b.sync()
                times.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
        return wrapper

    am = b.make("ip-adapter-plus-sdxl", refnet=False)
    targets = [(sdxl_mod, "prepare_subject"), (sdxl_mod, "clip_features"), (enc_mod, "preview_images"),
               (ref_mod, "reference_pass"), (ref_mod, "reference_token_mask"),
               (mm, "load_models_gpu"), (b.vae, "encode"), (am.adapter, "encode"), (ref_mod, "_to_device"),
               (graphs_mod, "_module_is_static")]
    with contextlib.ExitStack() as stack:
        for obj, name in targets:
            orig = getattr(obj, name)
            label = name if isinstance(obj, type(sys)) else f"{type(obj).__name__}.{name}"
            setattr(obj, name, timed(label, orig))
            stack.callback(setattr, obj, name, orig)
        b.encode(am, 1, reference, True)
        times.clear()
        _, total = b.encode(am, n, reference, True)
    lines = [f"subject encode ({reference} reference), ms per subject, median of {n} (sum of calls per encode):",
             f"  {'total':24s} {statistics.median(total):8.1f}"]
    for name, ts in times.items():
        per = [sum(ts[i::n]) for i in range(n)] if len(ts) % n == 0 else ts
        lines.append(f"  {name:24s} {statistics.median(per):8.1f}   ({len(ts) // n} call(s) per encode)")
    text = "\n".join(lines)
    print(text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "encode_breakdown.txt").write_text(text + "\n")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--subjects", default="1,2,4")
    ap.add_argument("--configs", default="public,native,regional,ipadapter_plus")
    ap.add_argument("--quick", action="store_true", help="tiny UNet, for checking the script on a CPU")
    ap.add_argument("--negative-rows", choices=tuple(NEGATIVE_MODES), default="background",
                    help="AnyStoryApply's negative_rows for the configurations with references: background (its "
                         "default), same (same references as positive) or both (each, one after the other)")
    ap.add_argument("--profile", default="", help="GROUP:N[,GROUP:N] (plain|public|native|encode|encode_parts|ablate_public|ablate_native|"
                                                  "host_plain|host_public|host_native|syncs_public|syncs_native|syncs_regional|graphs_public|"
                                                  "graphs_native) — profiles "
                                                  "(after the table unless --no-table)")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--allocator", choices=("asis", "comfyui"), default="asis",
                    help="comfyui: add backend:cudaMallocAsync to PYTORCH_CUDA_ALLOC_CONF, as ComfyUI's main.py does")
    args = ap.parse_args(argv)
    if args.allocator == "comfyui":
        if "torch" in sys.modules:
            print("[bench] --allocator comfyui: torch is already imported, the allocator cannot change", flush=True)
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync" if not conf else conf + ",backend:cudaMallocAsync"
    if args.quick:
        args.size, args.steps, args.repeats = min(args.size, 128), min(args.steps, 5), 1
    import torch
    print(f"[bench] PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')}", flush=True)
    with torch.inference_mode():
        b = Bench(args)
    out = Path(args.out)
    with torch.inference_mode():  # as ComfyUI runs every node
        if not args.no_table:
            b.run()
        for spec in filter(None, args.profile.split(",")):
            g, n = spec.split(":")
            if g == "encode_parts":
                encode_breakdown(b, int(n), out)
            elif g.startswith("ablate_"):
                ablate(b, g[len("ablate_"):], int(n), out)
            elif g.startswith("host_"):
                host_profile(b, g[len("host_"):], int(n), out)
            elif g.startswith("graphs_"):
                graphs_report(b, g[len("graphs_"):], int(n), out)
            elif g.startswith("syncs_"):
                sync_report(b, g[len("syncs_"):], int(n), out)
            else:
                profile(b, g, int(n), out)
    if args.no_table:
        return 0
    dev = torch.cuda.get_device_name(0) if b.cuda else "cpu"
    data = {"device": dev, "date": dt.date.today().isoformat(), "torch": torch.__version__,
            "size": args.size, "steps": args.steps, "cfg": args.cfg, "sampler": "euler",
            "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "configs": b.results}
    out.mkdir(parents=True, exist_ok=True)
    name = "latest" if not args.quick else "quick"
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"# AnyStory benchmark — {dev}, {data['date']}", "",
             f"SDXL {args.size}², {args.steps} steps, euler, cfg {args.cfg}, fp16, random weights, ComfyUI samplers; "
             f"{args.repeats} samplings per configuration, each right after a plain one. ms/step: median step-to-step "
             "interval; × plain: median ratio of each sampling to the plain sampling just before it (the plain "
             "ms/step of those is in the next column). PYTORCH_CUDA_ALLOC_CONF: "
             f"{data['cuda_alloc_conf'] or '(unset)'}.", "",
             "| configuration | subjects | ms/step | × plain | plain ms/step beside it | encode ms/subject | "
             "peak VRAM GB | overhead GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in b.results:
        lines.append(f"| {r['name']} | {r['subjects']} | {r['ms_per_step']} | {r['ratio_to_plain']} | "
                     f"{r.get('plain_ms_per_step_beside') or '–'} | "
                     f"{r['encode_ms_per_subject'] if r['encode_ms_per_subject'] is not None else '–'} | "
                     f"{r['peak_vram_gb']} | {r.get('vram_overhead_gb', 0)} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
