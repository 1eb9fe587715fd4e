"""`pip install .` (not editable) into a fresh venv installs one import root, pdserve: none of the
rooms' own names (kernels, cluster, deploy, bench, ...) becomes importable, and the command
and `python -m pdserve...` entry points work from the installed copy alone."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from pdserve import ROOMS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(
    ".venv", ".git", "build", "*.egg-info", "__pycache__", "results", ".pytest_cache"
)


def _run(*cmd, **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, bin folder, work folder) of a fresh venv holding a non-editable install of the
    tree. The venv has no pip of its own: this interpreter's pip installs into it. Its
    dependencies come from this interpreter's site-packages, added by a path line (a .pth line
    adds a folder without running the .pth files in it, so an editable install of the tree
    there stays out)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(purelib.strip()) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", src)
    (wheel,) = (tmp / "dist").glob("pdserve-*.whl")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel)
    work = tmp / "work"
    work.mkdir()
    return python, env_dir / "bin", work


def test_only_pdserve_is_installed(installed):
    python, _, work = installed
    code = f"""
import importlib.util, json, pathlib, sysconfig
import pdserve, pdserve.kernels, pdserve.cluster, pdserve.deploy.cli
purelib = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
found = {{}}
for name in {list(ROOMS)!r}:
    spec = importlib.util.find_spec(name)
    found[name] = spec.origin if spec else None
print(json.dumps({{"pdserve": pdserve.__file__, "kernels": pdserve.kernels.__file__,
                   "purelib": str(purelib), "found": found,
                   "top": sorted(p.name for p in purelib.iterdir())}}))
"""
    out = json.loads(_run(python, "-c", code, cwd=work))
    purelib = Path(out["purelib"])
    assert Path(out["pdserve"]).is_relative_to(purelib)
    assert Path(out["kernels"]) == purelib / "pdserve" / "kernels" / "__init__.py"
    ours = [n for n in out["top"] if n in ROOMS]
    assert not ours, f"top-level modules of ours installed: {ours}"
    for name, origin in out["found"].items():
        # either nothing or another distribution's package of that name (Hugging Face's kernels)
        assert origin is None or not (
            Path(origin).is_relative_to(purelib / name) or Path(origin).is_relative_to(ROOT / name)
        ), (name, origin)


def test_entry_points_run_from_the_installed_copy(installed, tmp_path):
    python, bin_dir, work = installed
    assert "make-model" in _run(bin_dir / "pdserve", "--help", cwd=work)
    assert "make-model" in _run(python, "-m", "pdserve", "--help", cwd=work)
    assert "--sweep" in _run(python, "-m", "pdserve.bench.kernels", "--help", cwd=work)
    model = tmp_path / "tiny"
    _run(bin_dir / "pdserve", "make-model", "--preset", "tiny", "--out", model, cwd=work)
    out = _run(
        python, "-m", "pdserve", "generate", "--model", model, "--max-tokens", "3",
        "--ignore-eos", "--device", "cpu", "hello", cwd=work,
    )  # fmt: skip
    assert "'hello' -> 3 tokens (length)" in out
