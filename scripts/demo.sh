#!/usr/bin/env bash
# The main job: set up the environment, make random-weight models, start a real ComfyUI server with
# this pack and render example_workflows/api/02_anystory_sdxl_two_subjects.json through /prompt. Arguments go to
# scripts/demo.py (--help).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$(ANYSTORY_BROWSER=0 bash "$here/scripts/setup_env.sh" | tail -n 1)  # the demo needs no browser
export ANYSTORY_PYTHON="$PY"
exec "$PY" "$here/scripts/demo.py" "$@"
