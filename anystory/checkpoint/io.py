"""Reading and writing weight files: safetensors headers, weights-only torch.load, atomic saves."""
from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .diagnosis import CheckpointError, _Source

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth")


# ------------------------------------------------------------------------------------------------
# reading files (safetensors or weights-only torch.load; never arbitrary unpickling)
# ------------------------------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.float16),
    "F8_E5M2": getattr(torch, "float8_e5m2", torch.float16),
}


def _safetensors_header(p: str, src: _Source, role: str, expected: str) -> tuple[dict, dict]:
    """Parse and check the header without reading tensors: (``{key: meta tensor}``, metadata).

    Detects truncation (the header's data offsets must cover the file exactly) and pickles that were
    renamed ``.safetensors``."""
    def corrupt(why: str) -> CheckpointError:
        return src.fail(role, f"a truncated or corrupted safetensors file ({why})", expected,
                        "re-download or re-create the file (a partial download is the usual cause)")

    size = os.path.getsize(p)
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"only {size} bytes, smaller than a safetensors header")
        n = int.from_bytes(head, "little")
        header = None
        if 0 < n <= min(size - 8, 200 * 2 ** 20):
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                header = e
    if not isinstance(header, dict):
        if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise src.fail(role, "a PyTorch pickle/zip file with a .safetensors name", expected,
                           "rename it to .bin (it is then read weights-only) or convert it to safetensors")
        if header is None:
            raise corrupt(f"the header claims {n} bytes but the file has {size}")
        if isinstance(header, Exception):
            raise corrupt(f"unreadable header: {header}")
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    shapes, end = {}, 0
    try:
        for k, info in header.items():
            dt = _ST_DTYPES.get(str(info["dtype"]), torch.float32)
            shapes[k] = torch.empty(tuple(info["shape"]), dtype=dt, device="meta")
            end = max(end, int(info["data_offsets"][1]))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise corrupt(f"malformed tensor entry: {e}") from None
    if 8 + n + end != size:
        got = size - 8 - n
        raise corrupt(f"the header describes {end} bytes of tensor data, the file holds {got}")
    return shapes, {str(k): str(v) for k, v in meta.items()}


def _torch_load(p: str, src: _Source, role: str, expected: str, mmap: bool = False):
    """``torch.load(p, map_location="cpu", weights_only=True)`` — the only way a pickle is ever read."""
    def load(use_mmap: bool):
        kw = {"mmap": True} if use_mmap else {}
        return torch.load(p, map_location="cpu", weights_only=True, **kw)

    try:
        try:
            return load(mmap)
        except pickle.UnpicklingError:
            raise
        except Exception:
            if not mmap:
                raise
            return load(False)  # legacy (non-zip) files cannot be memory-mapped
    except pickle.UnpicklingError as e:
        msg = str(e)
        why = re.search(r"WeightsUnpickler error:\s*([^\n]*)", msg)
        why = why.group(1) if why else msg.splitlines()[0] if msg else type(e).__name__
        if re.search(r"Unsupported (global|operand|class)|GLOBAL ", msg):
            obj = re.search(r"GLOBAL (\S+)", msg)
            detail = f" (it references {obj.group(1)})" if obj else f" ({why[:160]})"
            raise src.fail(role, "refused: not a weights-only file — it contains pickled Python objects beyond "
                           f"tensors and dicts{detail}, which could run code, so it was not loaded", expected,
                           "convert it to safetensors from a trusted source, or download the .safetensors "
                           "version of the file") from None
        raise src.fail(role, f"a truncated or corrupted PyTorch file ({why[:200]})", expected,
                       "re-download or re-create the file") from None
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise src.fail(role, f"a truncated or corrupted PyTorch file ({first})", expected,
                       "re-download or re-create the file (or use its .safetensors version)") from None


def _flatten(obj, src: _Source, role: str, expected: str) -> dict:
    """Nested dicts of tensors → flat ``{"a.b.c": tensor}``; non-tensor leaves (counters, strings)
    are ignored."""
    if not isinstance(obj, Mapping):
        raise src.fail(role, f"a file holding a {type(obj).__name__}, not a dict of tensors", expected,
                       "use a weights file (a dict of tensors)")
    out: dict = {}

    def walk(o, prefix):
        for k, v in o.items():
            key = f"{prefix}{k}"
            if torch.is_tensor(v):
                out[key] = v
            elif isinstance(v, Mapping):
                walk(v, key + ".")

    walk(obj, "")
    return out


def _read(path, role: str, expected: str, shapes_only: bool = False) -> tuple[dict, dict, _Source]:
    """Read a file: (flat ``{key: tensor}``, metadata, source). With ``shapes_only`` the tensors are
    meta tensors (safetensors) or memory-mapped (torch zip files) — nothing large is read."""
    if path is None or (isinstance(path, str) and not path):
        raise CheckpointError(f"AnyStory: no file given for {role}. Fix: pick a file.")
    src = _Source.of(path)
    p = src.path
    if not os.path.exists(p):
        raise src.fail(role, "missing: there is no such file", expected,
                       "check the name, and put the file in ComfyUI/models/anystory (or models/ipadapter)")
    if os.path.isdir(p):
        raise src.fail(role, "a directory, not a file", expected, "pick the weights file itself")
    ext = os.path.splitext(p)[1].lower()
    if ext in SAFETENSORS_EXTENSIONS:
        shapes, meta = _safetensors_header(p, src, role, expected)
        if shapes_only:
            return shapes, meta, src
        try:
            sd = load_file(p, device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise src.fail(role, f"a truncated or corrupted safetensors file ({e})", expected,
                           "re-download or re-create the file") from None
        return sd, meta, src
    if ext in PICKLE_EXTENSIONS:
        obj = _torch_load(p, src, role, expected, mmap=shapes_only)
        return _flatten(obj, src, role, expected), {}, src
    raise src.fail(role, f"a file with the unsupported extension '{ext or '(none)'}'", expected,
                   "use a .safetensors file (or an IP-Adapter .bin/.pt/.pth, read weights-only)")


def _prepare_for_save(sd: Mapping) -> dict:
    """Detached, contiguous CPU tensors that share no storage (safetensors refuses shared tensors)."""
    out, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().to("cpu").contiguous()
        if t.numel():
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Write a file atomically: ``write(tmp)`` to ``<path>.tmp-<pid>`` beside it, then rename it over
    ``path`` (a crash never leaves a half-written file under the real name; the temp file is removed on
    failure). Missing folders are created."""
    p = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = f"{p}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_save(tensors: dict, path, meta: dict, role: str) -> None:
    p = os.path.abspath(os.fspath(path))
    if os.path.splitext(p)[1].lower() not in SAFETENSORS_EXTENSIONS:
        raise _Source.of(p).fail(role, "a target name without the .safetensors extension", "a .safetensors path",
                                 "name the file *.safetensors")
    atomic_write(p, lambda tmp: save_file(tensors, tmp, metadata=meta))
