"""Where a benchmark's JSON goes: ``--out``, or ``bench/results/<kind>-<gpu>.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def write_result(result: dict[str, Any], kind: str, device: str, out: str | Path | None) -> Path:
    """Write ``result`` as indented JSON and say where; ``device`` names the default file."""
    name = device.split(" (")[0].replace(" ", "_")  # "NVIDIA H200 (sm_90, ...)" -> NVIDIA_H200
    path = Path(out) if out else RESULTS / f"{kind}-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    return path
