#!/usr/bin/env bash
# The test command: sets up the environment (scripts/setup_env.sh) and runs the whole test suite.
# ComfyUI tests use the ComfyUI tree at $COMFYUI_PATH (default /opt/ComfyUI) and are skipped, loudly,
# when it is absent. Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$(bash "$here/scripts/setup_env.sh" | tail -n 1)
cd "$here"
exec "$PY" -m pytest -ra "$@" tests
