"""The test command works in a checkout whose folder name is not a Python identifier — the folder a
plain ``git clone`` makes (``comfyui-anystory``), and the one users have in ComfyUI/custom_nodes."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tests_run_in_a_hyphenated_checkout(tmp_path):
    dst = tmp_path / "comfyui-anystory"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if rel.startswith(("tests/", "anystory/")) or rel in ("__init__.py", "pyproject.toml"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / rel).is_file():
                shutil.copy2(ROOT / rel, dst / rel)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/anystory/test_layers.py"],
                         cwd=dst, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
