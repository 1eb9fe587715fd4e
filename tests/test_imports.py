"""kernels, cluster and deploy are also names of unrelated PyPI packages: make sure the
project's own folders are the ones imported."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name", ["kernels", "cluster", "prefill_worker", "decode_worker", "deploy", "bench"]
)
def test_project_folders_are_imported(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(ROOT / name)


def test_kernels_import_nothing_of_the_project():
    for path in (ROOT / "kernels").rglob("*.py"):
        text = path.read_text()
        for other in ("cluster", "prefill_worker", "decode_worker", "deploy"):
            assert f"from {other}" not in text and f"import {other}" not in text, path


def test_cluster_imports_no_worker_or_deploy():
    for path in (ROOT / "cluster").rglob("*.py"):
        text = path.read_text()
        for other in ("prefill_worker", "decode_worker", "deploy"):
            assert f"from {other}" not in text and f"import {other}" not in text, path
