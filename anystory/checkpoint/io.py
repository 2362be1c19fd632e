"""Reading and writing the weight files (the AnyStory model with E_i's QFormer, Ŵ_k^l / Ŵ_v^l and the
router; the ReferenceNet), safely.

- safetensors: the header is parsed and checked against the file size before any tensor is read, so a
  partial download or a pickle renamed ``.safetensors`` is told apart from a foreign file; with
  ``shapes_only`` the tensors are meta tensors (nothing large is read);
- pickles (``.bin``/``.pt``/``.pth``, the official IP-Adapter layout): only ever through
  ``torch.load(..., weights_only=True)`` — nothing here unpickles code; nested dicts are flattened;
- writing: tensors made contiguous CPU copies that share no storage, then an atomic save
  (:func:`atomic_write`: temp file beside the target, then rename), which the router training also
  uses for its resumable state.
"""
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

from .diagnosis import REDOWNLOAD, CheckpointError, Slot, Source

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth")


# ------------------------------------------------------------------------------------------------
# reading (safetensors, or weights-only torch.load: never arbitrary unpickling)
# ------------------------------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.float16),
    "F8_E5M2": getattr(torch, "float8_e5m2", torch.float16),
}


TRUNCATED = "a truncated or corrupted file"
REDOWNLOAD_PARTIAL = "re-download or re-create the file (a partial download is the usual cause)"
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _header_json(p: str, size: int, src: Source, slot: Slot) -> tuple[int, object, bytes]:
    """(header length n, the parsed header — or None when n does not fit the file, or the decode error —,
    the first 8 bytes)."""
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise src.fail(slot, f"{TRUNCATED} (only {size} bytes)", REDOWNLOAD_PARTIAL,
                           f"{size} bytes, smaller than a safetensors header")
        n = int.from_bytes(head, "little")
        header = None
        if 0 < n <= min(size - 8, 200 * 2 ** 20):
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                header = e
    return n, header, head


def safetensors_header(p: str, src: Source, slot: Slot) -> tuple[dict, dict]:
    """Parse and check the header without reading tensors: (``{key: meta tensor}``, metadata).

    Detects truncation (the header's data offsets must cover the file exactly) and pickles that were
    renamed ``.safetensors``."""
    def corrupt(why: str) -> CheckpointError:
        return src.fail(slot, TRUNCATED, REDOWNLOAD_PARTIAL, f"safetensors: {why}")

    size = os.path.getsize(p)
    n, header, head = _header_json(p, size, src, slot)
    if not isinstance(header, dict):
        if head.startswith(PICKLE_MAGIC):
            raise src.fail(slot, "a PyTorch pickle/zip file with a .safetensors name",
                           "rename it to .bin (it is then read weights-only) or convert it to safetensors")
        if header is None:
            raise corrupt(f"the header claims {n} bytes but the file has {size}")
        if isinstance(header, Exception):
            raise corrupt(f"unreadable header: {header}")
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
        raise corrupt(f"the header describes {end} bytes of tensor data, the file holds {size - 8 - n}")
    return shapes, {str(k): str(v) for k, v in meta.items()}


def torch_load(p: str, src: Source, slot: Slot, mmap: bool = False):
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
            ref = f" (it references {obj.group(1)})" if obj else ""
            raise src.fail(slot, f"a file with pickled Python objects that could run code{ref}, so it was refused "
                           "unread", "download the .safetensors version of the file, or convert it to safetensors "
                           "from a trusted source", f"not a weights-only file: {obj.group(0) if obj else why[:200]}"
                           ) from None
        raise src.fail(slot, TRUNCATED, REDOWNLOAD, f"PyTorch file: {why[:200]}") from None
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise src.fail(slot, TRUNCATED, f"{REDOWNLOAD} (or use its .safetensors version)",
                       f"PyTorch file: {first}") from None


def flatten(obj, src: Source, slot: Slot) -> dict:
    """Nested dicts of tensors → flat ``{"a.b.c": tensor}``; non-tensor leaves (counters, strings)
    are ignored."""
    if not isinstance(obj, Mapping):
        raise src.fail(slot, f"a file holding a {type(obj).__name__}, not weights", "pick a weights file")
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


def read_weights(path, slot: Slot, shapes_only: bool = False) -> tuple[dict, dict, Source]:
    """Read a file: (flat ``{key: tensor}``, metadata, source). With ``shapes_only`` the tensors are
    meta tensors (safetensors) or memory-mapped (torch zip files) — nothing large is read."""
    if path is None or (isinstance(path, str) and not path):
        raise CheckpointError(f"AnyStory: no file was given for {slot.role} — pick a file.", expected=slot.expected)
    src = Source.of(path)
    p = src.path
    if not os.path.exists(p):
        raise src.fail(slot, "not there (no such file)",
                       "check the name, and put the file in ComfyUI/models/anystory (or models/ipadapter)")
    if os.path.isdir(p):
        raise src.fail(slot, "a directory, not a file", "pick the weights file itself")
    ext = os.path.splitext(p)[1].lower()
    if ext in SAFETENSORS_EXTENSIONS:
        shapes, meta = safetensors_header(p, src, slot)
        if shapes_only:
            return shapes, meta, src
        try:
            sd = load_file(p, device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise src.fail(slot, TRUNCATED, REDOWNLOAD, f"safetensors: {e}") from None
        return sd, meta, src
    if ext in PICKLE_EXTENSIONS:
        obj = torch_load(p, src, slot, mmap=shapes_only)
        return flatten(obj, src, slot), {}, src
    raise src.fail(slot, f"a file with the unsupported extension '{ext or '(none)'}'",
                   "use a .safetensors file (or an IP-Adapter .bin/.pt/.pth, read weights-only)")


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def prepare_for_save(sd: Mapping) -> dict:
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


def save_safetensors(tensors: dict, path, meta: dict, slot: Slot) -> None:
    """Write ``tensors`` (from :func:`prepare_for_save`) and string metadata as safetensors, atomically."""
    p = os.path.abspath(os.fspath(path))
    if os.path.splitext(p)[1].lower() not in SAFETENSORS_EXTENSIONS:
        raise Source.of(p).fail(slot, "a target name without the .safetensors extension", "name the file *.safetensors")
    atomic_write(p, lambda tmp: save_file(tensors, tmp, metadata=meta))
