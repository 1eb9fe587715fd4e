"""One import root: the rooms import as pdserve.<room>, never under their own names (kernels,
cluster, deploy and bench are also names of unrelated packages), and the dependency rule holds."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import pdserve

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("room", pdserve.ROOMS)
def test_rooms_import_under_pdserve_from_their_folders(room):
    module = importlib.import_module(f"pdserve.{room}")
    assert Path(module.__file__).resolve().is_relative_to(ROOT / room)


def _imports(path: Path) -> set[str]:
    text = path.read_text()
    names = set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", text, re.M))
    for group in re.findall(r"^\s*from pdserve import \(?([\w, ]+)", text, re.M):
        names |= {f"pdserve.{n.strip()}" for n in group.split(",") if n.strip()}
    return names


def test_no_module_imports_a_room_by_its_bare_name():
    bare = [
        (str(path.relative_to(ROOT)), name)
        for room in (*pdserve.ROOMS, "tests")
        for path in (ROOT / room).rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in pdserve.ROOMS
    ]
    assert not bare, bare


@pytest.mark.parametrize(
    "room, forbidden",
    [
        ("kernels", ("cluster", "prefill_worker", "decode_worker", "deploy", "bench")),
        ("cluster", ("prefill_worker", "decode_worker", "deploy", "bench")),
        ("prefill_worker", ("decode_worker", "deploy", "bench")),
        ("decode_worker", ("prefill_worker", "deploy", "bench")),
    ],
)
def test_dependency_rule(room, forbidden):
    for path in (ROOT / room).rglob("*.py"):
        for name in _imports(path):
            parts = name.split(".")
            assert not (parts[0] == "pdserve" and len(parts) > 1 and parts[1] in forbidden), (
                path,
                name,
            )
