"""Convert the authors' AnyStory FLUX file (``anystory_flux.bin``, a weights-only torch pickle) to ``.safetensors``.

    python scripts/convert_anystory_flux.py models/anystory/anystory_flux.bin [out.safetensors]

The pickle is read with ``torch.load(weights_only=True)`` only. The output holds the same tensors under
``ref.`` / ``redux.`` / ``router.`` with metadata ``format=anystory-flux`` and the peft α of each LoRA adapter as the
authors' loader resolves it (from the pickle's key order, which safetensors does not keep). Refuses files that are
not the AnyStory FLUX layout (anystory.flux.checkpoint.CheckpointError says what was found and the fix).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _core():
    """The core package by location (the repo root is not put on sys.path: its nodes/ would shadow ComfyUI's)."""
    if "anystory" not in sys.modules:
        spec = importlib.util.spec_from_file_location("anystory", ROOT / "anystory" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "anystory")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["anystory"] = mod
        spec.loader.exec_module(mod)
    import anystory.flux.checkpoint as ckpt
    return ckpt


def convert(src: str, dst: str) -> dict:
    ckpt = _core()
    parts, alphas = ckpt.read_flux_parts(src)
    meta = ckpt.save_flux_safetensors(parts, dst, alphas=alphas)
    ckpt.load_flux_checkpoint(dst)  # it must read back
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst", nargs="?")
    a = ap.parse_args(argv)
    dst = a.dst or str(Path(a.src).with_suffix(".safetensors"))
    try:
        meta = convert(a.src, dst)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst} ({meta})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
