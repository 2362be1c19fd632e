#!/usr/bin/env bash
# Create (or reuse) the Python environment shared by the tests and the demo, outside the repo:
#   $ANYSTORY_VENV (default ~/.cache/comfyui-anystory/venv)
# It holds torch + torchvision, the test tools, and ComfyUI's own requirements when ComfyUI is found
# at $COMFYUI_PATH (default /opt/ComfyUI). Prints the venv's python path on the last line.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${ANYSTORY_VENV:-$HOME/.cache/comfyui-anystory/venv}
COMFYUI_PATH=${COMFYUI_PATH:-/opt/ComfyUI}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
pipq() {  # quiet pip; drops the machine's "Location ... is ignored" noise
  { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither a file" || true; }; } >&2
}
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing torch + torchvision (a few minutes the first time)" >&2
  case "$(uname -m)" in
    aarch64|arm64) pipq "torch==2.9.1" "torchvision==0.24.1" ;;
    *) pipq "torch==2.14.1" "torchvision==0.29.1" ;;
  esac
fi
reqs=("$here/requirements-test.txt")
if [ -f "$COMFYUI_PATH/requirements.txt" ]; then
  # ComfyUI's requirements minus torch/torchvision/torchaudio (torch is installed above; audio nodes unused)
  grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$COMFYUI_PATH/requirements.txt" > "$VENV/comfyui-requirements.txt"
  reqs+=("$VENV/comfyui-requirements.txt")
fi
stamp="$VENV/.anystory-reqs-$(cat "${reqs[@]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing requirements" >&2
  args=(); for r in "${reqs[@]}"; do args+=(-r "$r"); done
  pipq "${args[@]}"
  touch "$stamp"
fi
# Browser tests (tests/web): playwright-core from package-lock.json into ./node_modules (npm ci, ~1 s,
# only when the lockfile changed), and Debian's chromium when it is missing and we are root with apt
# (about a minute, once per machine). ANYSTORY_BROWSER=0 skips both; without them the browser tests
# are skipped with a red banner.
if [ "${ANYSTORY_BROWSER:-1}" != "0" ]; then
  if command -v npm >/dev/null 2>&1 && [ -f "$here/package-lock.json" ]; then
    nstamp="$here/node_modules/.anystory-lock-$(sha1sum "$here/package-lock.json" | cut -c1-12)"
    if [ ! -f "$nstamp" ] || [ ! -f "$here/node_modules/playwright-core/package.json" ]; then
      echo "[setup] npm ci (playwright-core for the browser tests)" >&2
      if (cd "$here" && npm ci --no-audit --no-fund --loglevel=error >&2); then touch "$nstamp"
      else echo "[setup] WARNING: npm ci failed; the browser tests will be skipped" >&2; fi
    fi
  fi
  chrome=${ANYSTORY_CHROMIUM:-/usr/bin/chromium}
  if [ ! -x "$chrome" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian chromium + chromium-driver for the browser tests (about a minute, once)" >&2
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
        >"$VENV/apt-chromium.log" 2>&1; then
      echo "[setup] WARNING: apt-get install chromium failed (see $VENV/apt-chromium.log); browser tests will be skipped" >&2
    fi
  fi
fi
echo "$PY"
