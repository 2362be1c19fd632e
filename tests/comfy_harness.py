"""Helpers for tests that need REAL ComfyUI (found through ``COMFYUI_PATH``, default /opt/ComfyUI).

In-process:
- :func:`comfy_available` / :func:`import_comfy`: put ComfyUI on ``sys.path`` and import it for CPU use;
- :func:`load_pack`: import this repo as a ComfyUI custom node package, the way ComfyUI does;
- :func:`tiny_sdxl` / :func:`tiny_sd15`: tiny random-weight UNets of the SDXL / SD1.5 architectures
  wrapped in a ``ModelPatcher``; :func:`tiny_cond` makes CONDITIONING for them; :func:`sample` runs
  ``comfy.sample.sample`` and returns the latent.

Out of process:
- :class:`ComfyServer`: a headless ``main.py --cpu`` server on a free port over a throw-away base
  directory with this pack linked into ``custom_nodes/``; submit API workflows over HTTP.

The repo root is never put on ``sys.path``: the pack's ``nodes/`` folder would shadow ComfyUI's
top-level ``nodes`` module (tests/conftest.py registers the core package ``anystory`` by location).
Standard library only (plus torch and ComfyUI itself for the in-process part).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
PACK_MODULE_NAME = "comfyui_anystory"
PACK_DIR_NAME = "comfyui-anystory"


# ----------------------------------------------------------------------------------------------------
# Finding and importing ComfyUI
# ----------------------------------------------------------------------------------------------------
def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI")).expanduser().resolve()


def comfy_available() -> tuple[bool, str]:
    """(True, "ComfyUI <version> at <path>") or (False, why not)."""
    root = comfyui_path()
    for rel in ("main.py", "nodes.py", "comfy/model_management.py", "comfy/cli_args.py"):
        if not (root / rel).is_file():
            return False, f"REAL ComfyUI NOT FOUND at {root} (no {rel})"
    version = "?"
    vf = root / "comfyui_version.py"
    if vf.is_file():
        for line in vf.read_text().splitlines():
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("\"'")
    try:
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover
        return False, f"ComfyUI found at {root} but torch is not importable: {e}"
    return True, f"ComfyUI {version} at {root}"


def _repo_root_off_sys_path() -> None:
    """Drop the repo root from sys.path (``python -m pytest`` run in the repo puts the cwd there)."""
    def is_repo(p):
        return os.path.abspath(p or os.getcwd()) == str(REPO)
    sys.path[:] = [p for p in sys.path if not is_repo(p)]


class ComfyModules:
    """The ComfyUI modules tests use, imported for CPU."""

    def __init__(self):
        import comfy.cli_args
        self.cli_args = comfy.cli_args
        import comfy.clip_vision
        import comfy.model_base
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sample
        import comfy.samplers
        import comfy.sd
        import comfy.supported_models
        import comfy.utils
        import folder_paths
        self.comfy = comfy
        self.model_management = comfy.model_management
        self.model_patcher = comfy.model_patcher
        self.model_base = comfy.model_base
        self.supported_models = comfy.supported_models
        self.sample = comfy.sample
        self.samplers = comfy.samplers
        self.sd = comfy.sd
        self.utils = comfy.utils
        self.clip_vision = comfy.clip_vision
        self.folder_paths = folder_paths

    @property
    def nodes(self):
        """ComfyUI's top-level ``nodes`` module (imported on first use: it pulls in a lot)."""
        return importlib.import_module("nodes")


_COMFY: Optional[ComfyModules] = None


def import_comfy() -> ComfyModules:
    """Import ComfyUI from ``COMFYUI_PATH`` for CPU use and return its modules (cached).

    Puts COMFYUI_PATH at sys.path[0] and sets ``comfy.cli_args.args.cpu = True`` before anything
    imports ``comfy.model_management`` (otherwise it asks CUDA for the device)."""
    global _COMFY
    if _COMFY is not None:
        return _COMFY
    ok, why = comfy_available()
    if not ok:
        raise RuntimeError(why)
    root = str(comfyui_path())
    _repo_root_off_sys_path()
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    nodes_mod = sys.modules.get("nodes")
    if nodes_mod is not None and not str(getattr(nodes_mod, "__file__", "")).startswith(root):
        raise RuntimeError(f"a module named 'nodes' from {nodes_mod.__file__} is already imported; "
                           "it would shadow ComfyUI's nodes.py (is the repo root on sys.path?)")
    if "comfy.model_management" in sys.modules:
        import comfy.cli_args
        if not comfy.cli_args.args.cpu:
            raise RuntimeError("comfy.model_management was imported before import_comfy() set --cpu")
    import comfy.cli_args
    import comfy.options  # noqa: F401  (args_parsing stays False: parse_args([]))
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_auto_launch = True
    _COMFY = ComfyModules()
    return _COMFY


def load_pack(name: str = PACK_MODULE_NAME):
    """Import this repo as a ComfyUI custom node package (``spec_from_file_location`` of its
    ``__init__.py`` with the repo as the package's search location), the way ComfyUI's
    ``nodes.load_custom_node`` does. Returns the module (cached in sys.modules under ``name``)."""
    import_comfy()
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def pack_module(sub: str):
    """A submodule of the pack as the pack itself imported it, e.g. ``pack_module("anystory.adapter")``
    or ``pack_module("nodes.types")``. Note: the pack's nodes import the core relatively, i.e. as
    ``comfyui_anystory.anystory.*`` — NOT the same module objects (classes) as the top-level ``anystory``
    that tests/conftest.py registers; compare/isinstance against classes taken from here."""
    load_pack()
    return importlib.import_module(f"{PACK_MODULE_NAME}.{sub}")


# ----------------------------------------------------------------------------------------------------
# Tiny in-process models
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def model_folders(folder_paths, folders: dict):
    """ComfyUI's model folders ``name → (directories, extensions)`` set in ``folder_paths`` for the block
    (its file-list cache cleared), then every one of them put back as it was (or removed if it was absent)."""
    names = folder_paths.folder_names_and_paths
    old = {k: names.get(k) for k in folders}
    names.update({k: (list(dirs), set(exts)) for k, (dirs, exts) in folders.items()})
    folder_paths.filename_list_cache.clear()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                names.pop(k, None)
            else:
                names[k] = v
        folder_paths.filename_list_cache.clear()


def init_weights_(module, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic init for modules built with comfy.ops (which leaves weights uninitialised):
    GroupNorm/LayerNorm weight 1 bias 0, every other parameter N(0, std²)."""
    import torch
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _, m in module.named_modules():
            own = list(m.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                for pn, p in own:
                    p.fill_(1.0 if pn == "weight" else 0.0)
                continue
            for _, p in own:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))


def tiny_sdxl_unet_config(model_channels: int = 32, context_dim: int = 64, **overrides) -> dict:
    """A small UNet config of the SDXL architecture (linear proj_in/out, ADM 2816, [1,2,4] levels)."""
    cfg = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
        "model_channels": model_channels, "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 1, 1], "transformer_depth_output": [0, 0, 1, 1, 1, 1],
        "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": context_dim,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }
    cfg.update(overrides)
    return cfg


def _patcher(model):
    import torch
    mm = import_comfy().model_patcher
    return mm.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def tiny_sdxl(seed: int = 0, dtype=None, unet_overrides: Optional[dict] = None,
              model_channels: int = 32, context_dim: int = 64, num_head_channels: int = 16):
    """A tiny SDXL-architecture model (``comfy.model_base.SDXL``, random weights) in a CPU ``ModelPatcher``.

    With the defaults (model_channels 32, 16-d heads) its 7 transformer blocks (one per SpatialTransformer)
    are input 3 (C=64), input 5 (C=128), middle (C=128), output 0, 1 (C=128), output 2, 3 (C=64); none
    at the full-resolution level, like SDXL. Context 64-d (:func:`tiny_cond` ``ctx=64``).
    ``unet_overrides`` update the UNet config (after the head-channel override)."""
    import torch
    C = import_comfy()
    dtype = dtype or torch.float32
    cfg = C.supported_models.SDXL(tiny_sdxl_unet_config(model_channels, context_dim))
    cfg.unet_config["num_head_channels"] = num_head_channels  # the base class forces 64
    cfg.unet_config["num_heads"] = -1
    if unet_overrides:
        cfg.unet_config.update(unet_overrides)
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    model.eval()
    return _patcher(model)


def tiny_sd15(seed: int = 0, dtype=None, model_channels: int = 32, context_dim: int = 64):
    """A tiny SD1.5-architecture model (``comfy.model_base.BaseModel``, conv proj_in, no ADM, 8 heads)."""
    import torch
    C = import_comfy()
    dtype = dtype or torch.float32
    ucfg = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 4], "transformer_depth": [1, 1, 0],
        "transformer_depth_output": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": context_dim,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }
    cfg = C.supported_models.SD15(ucfg)
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    model.eval()
    return _patcher(model)


def tiny_cond(batch: int = 1, ctx: int = 64, width: int = 1024, height: int = 1024, seed: int = 0,
              tokens: int = 77, pooled: bool = True):
    """CONDITIONING ``[[context [batch, tokens, ctx], {"pooled_output": [batch, 1280], "width", "height"}]]``
    (``pooled=False`` gives SD1.5-style conditioning with an empty dict)."""
    import torch
    g = torch.Generator().manual_seed(int(seed))
    c = torch.randn(batch, tokens, ctx, generator=g)
    extra = {}
    if pooled:
        extra = {"pooled_output": torch.randn(batch, 1280, generator=g), "width": width, "height": height}
    return [[c, extra]]


def sample(model, positive, negative, latent, steps: int = 2, cfg: float = 5.0, sampler: str = "euler",
           scheduler: str = "normal", seed: int = 0, denoise: float = 1.0):
    """Run ``comfy.sample.sample`` (what KSampler does) on ``latent`` [B, 4, h, w]; returns the latent."""
    C = import_comfy()
    latent = C.sample.fix_empty_latent_channels(model, latent)
    noise = C.sample.prepare_noise(latent, seed)
    return C.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                           denoise=denoise, disable_pbar=True, seed=seed)


# ----------------------------------------------------------------------------------------------------
# A real ComfyUI server
# ----------------------------------------------------------------------------------------------------
class PromptRejected(RuntimeError):
    """POST /prompt answered HTTP 400: the workflow failed validation."""

    def __init__(self, status: int, body: dict):
        self.status = status
        self.body = body
        self.error = body.get("error", {}) if isinstance(body, dict) else {}
        self.node_errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
        super().__init__(f"/prompt rejected (HTTP {status}): {json.dumps(body, indent=1)[:4000]}")

    def messages(self) -> list[str]:
        """Every message/details string in the error and node_errors, for ``any(... in m ...)`` asserts."""
        out = []
        for e in [self.error] + [x for ne in self.node_errors.values() for x in ne.get("errors", [])]:
            if isinstance(e, dict):
                out += [str(e.get("message", "")), str(e.get("details", ""))]
        return out


class ExecutionFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``with ComfyServer(base_dir) as srv: srv.run(workflow)`` — a headless ComfyUI on CPU.

    Runs ``<python> <COMFYUI_PATH>/main.py --cpu --listen 127.0.0.1 --port P --base-directory DIR
    --disable-auto-launch --database-url sqlite:///DIR/user/comfyui.db`` (+ ``extra_args``) with
    cwd=DIR, stdout+stderr to ``DIR/comfyui.log`` (truncated at each start). The pack is symlinked to
    ``DIR/custom_nodes/comfyui-anystory``. ``base_dir=None`` makes (and later removes) a temp dir.
    models/ is whatever the caller put under DIR/models.
    """

    def __init__(self, base_dir=None, python: Optional[str] = None, port: Optional[int] = None,
                 extra_args=(), startup_timeout: float = 120.0, link_pack: bool = True, env: Optional[dict] = None,
                 cpu: bool = True):
        ok, why = comfy_available()
        if not ok:
            raise RuntimeError(why)
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="anystory-comfy-")).resolve()
        self.python = python or os.environ.get("ANYSTORY_PYTHON") or sys.executable
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.link_pack = link_pack
        self.env = env
        self.cpu = cpu  # False: let ComfyUI use the GPU (the device machine)
        self.log_path = self.base_dir / "comfyui.log"
        self.proc: Optional[subprocess.Popen] = None
        self.client_id = uuid.uuid4().hex
        self._log_fh = None

    # -- life cycle -------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [self.python, str(comfyui_path() / "main.py"), *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", str(self.base_dir), "--disable-auto-launch",
                "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}", *self.extra_args]

    def start(self) -> "ComfyServer":
        for d in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base_dir / d).mkdir(parents=True, exist_ok=True)
        if self.link_pack:
            link = self.base_dir / "custom_nodes" / PACK_DIR_NAME
            if link.is_symlink() or link.exists():
                if link.is_symlink() and link.resolve() == REPO:
                    pass
                else:
                    raise RuntimeError(f"{link} exists and is not a link to {REPO}")
            else:
                link.symlink_to(REPO, target_is_directory=True)
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "DO_NOT_TRACK": "1"})
        env.pop("PYTHONPATH", None)
        if self.env:
            env.update(self.env)
        self._log_fh = open(self.log_path, "wb")  # one log per start
        self.proc = subprocess.Popen(self.command(), cwd=str(self.base_dir), stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"ComfyUI exited with code {self.proc.returncode} during start-up")
            try:
                self._request("GET", "/object_info", timeout=30)
                self.started_in = self.startup_timeout - (deadline - time.monotonic())
                return self
            except (urllib.error.URLError, ConnectionError, OSError, TimeoutError) as e:
                last = e
            time.sleep(0.5)
        self._fail(f"ComfyUI did not answer GET /object_info within {self.startup_timeout:.0f} s ({last})")

    def _fail(self, msg: str):
        tail = self.log_tail(80)
        self.stop()
        raise RuntimeError(f"{msg}\n--- {self.log_path} (tail) ---\n{tail}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- HTTP -------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, payload=None, timeout: float = 60):
        data = None
        headers = {}
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def get_json(self, path: str, timeout: float = 60):
        return self._request("GET", path, timeout=timeout)

    def object_info(self, node_class: Optional[str] = None) -> dict:
        if node_class:
            return self.get_json("/object_info/" + urllib.parse.quote(node_class))
        return self.get_json("/object_info")

    def require_nodes(self, *names: str) -> dict:
        """object_info of ``names``; raises (with the pack's import errors and the log tail) if any
        is missing — e.g. because the pack failed to import."""
        info = self.object_info()
        missing = [n for n in names if n not in info]
        if missing:
            errs = "\n".join(self.pack_import_errors()) or "(no import error of the pack in the log)"
            raise AssertionError(f"ComfyUI does not list node(s) {missing}.\npack import errors:\n{errs}\n"
                                 f"--- log tail ---\n{self.log_tail(30)}")
        return {n: info[n] for n in names}

    def validate(self, workflow: dict) -> tuple[int, dict]:
        """POST /prompt; returns (HTTP status, JSON body) without raising (it is queued when 200)."""
        try:
            return 200, self._request("POST", "/prompt", {"prompt": workflow, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": {"message": raw.decode(errors="replace")}, "node_errors": {}}
            return e.code, body

    def queue_prompt(self, workflow: dict) -> str:
        """POST /prompt → prompt_id. Raises :class:`PromptRejected` (with ``node_errors``) on HTTP 400."""
        status, body = self.validate(workflow)
        if status != 200:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        h = self.get_json(f"/history/{prompt_id}")
        return (h or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Wait until the prompt finished (success or error) and return its history entry:
        ``{"prompt", "outputs", "status": {"status_str", "completed", "messages": [[event, data], ...]}}``;
        :func:`execution_error` extracts the ``execution_error`` message (exception_message, traceback,
        node_id, node_type) of a failed run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                entry = self.history(prompt_id)
            except (TimeoutError, OSError) as e:  # a busy (CPU-starved) server answers late: ask again
                if not self.alive:
                    raise RuntimeError(f"ComfyUI died while running {prompt_id}\n{self.log_tail(60)}") from e
                time.sleep(1.0)
                continue
            if entry is not None:
                st = entry.get("status") or {}
                if st.get("completed") or st.get("status_str") in ("success", "error"):
                    return entry
            if not self.alive:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}\n{self.log_tail(60)}")
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s\n{self.log_tail(40)}")

    def run(self, workflow: dict, timeout: float = 300.0, expect_success: bool = True) -> dict:
        """queue_prompt + wait. With ``expect_success`` a failed run raises :class:`ExecutionFailed`
        carrying the execution_error details and the log tail."""
        entry = self.wait(self.queue_prompt(workflow), timeout=timeout)
        if expect_success and (entry.get("status") or {}).get("status_str") != "success":
            err = execution_error(entry)
            raise ExecutionFailed(f"workflow failed: {json.dumps(err, indent=1)[:6000]}\n"
                                  f"--- log tail ---\n{self.log_tail(40)}")
        return entry

    def output_files(self, entry: dict, kind: str = "images") -> list[Path]:
        """Paths of the files an executed prompt wrote (``outputs[*][kind]`` entries of type output/temp)."""
        out = []
        for node_out in (entry.get("outputs") or {}).values():
            for f in node_out.get(kind, []) or []:
                root = self.base_dir / ("temp" if f.get("type") == "temp" else
                                        "input" if f.get("type") == "input" else "output")
                out.append(root / f.get("subfolder", "") / f["filename"])
        return out

    def free_memory(self) -> None:
        """POST /free: unload models and free memory between tests."""
        try:
            self._request("POST", "/free", {"unload_models": True, "free_memory": True})
        except urllib.error.HTTPError:
            pass

    # -- log ----------------------------------------------------------------------------------------
    def log_text(self) -> str:
        if self._log_fh is not None:
            self._log_fh.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def pack_import_errors(self) -> list[str]:
        """Log lines saying this pack failed to import ("IMPORT FAILED" / "Cannot import" / "Skip"),
        each with the traceback ComfyUI logged just before it. Empty when it imported cleanly."""
        lines = self.log_text().splitlines()
        marker = f"custom_nodes{os.sep}{PACK_DIR_NAME}"
        errors = []
        for i, line in enumerate(lines):
            if marker not in line:
                continue
            if "Cannot import" in line:  # preceded by the traceback ComfyUI logged
                j = i
                while j > 0 and i - j < 80 and not lines[j].startswith("Traceback"):
                    j -= 1
                errors.append("\n".join(lines[j if lines[j].startswith("Traceback") else i:i + 1]))
            elif "IMPORT FAILED" in line or line.lstrip().startswith("Skip "):
                errors.append(line.strip())
        return errors


def execution_error(entry: dict) -> Optional[dict]:
    """The ``execution_error`` (or ``execution_interrupted``) data of a history entry, else None."""
    for msg in (entry.get("status") or {}).get("messages", []) or []:
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] in ("execution_error", "execution_interrupted"):
            return dict(msg[1], event=msg[0])
    return None


def txt2img_workflow(ckpt_name: str, positive: str = "a photo of a cat", negative: str = "blurry",
                     width: int = 64, height: int = 64, steps: int = 2, cfg: float = 5.0, seed: int = 0,
                     batch: int = 1, prefix: str = "anystory_test") -> dict:
    """Plain txt2img API workflow: CheckpointLoaderSimple → CLIPTextEncode ×2 → EmptyLatentImage →
    KSampler → VAEDecode → SaveImage (node ids "1".."7")."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                    "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def load_module(name: str, path):
    """A Python file (scripts/, bench/, tests/nodes/anystory_fixtures.py …) as module ``name``, loaded once
    by file location: the repo root stays off sys.path (see the module docstring)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_make_models():
    """scripts/make_models.py as a module (by file location)."""
    return load_module("anystory_make_models", REPO / "scripts" / "make_models.py")
