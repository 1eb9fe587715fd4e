"""pdserve: prefill/decode-disaggregated serving of MXFP4 mixture-of-experts LLMs on Ray Serve.

The one import root of the project. Its rooms are folders at the repository's top level
(``kernels/``, ``cluster/``, ``prefill_worker/``, ``decode_worker/``, ``deploy/``, ``bench/``)
and import as ``pdserve.kernels``, ``pdserve.cluster``, ...: an install copies them under
``pdserve/`` (``package-dir`` in ``pyproject.toml``); run from a source tree, this package's
``__path__`` also names the tree's root, so the same names resolve to the folders there.
Nothing of the project is importable under the rooms' own names (``kernels``, ``cluster``,
``deploy`` and ``bench`` are other packages' names too).
"""

from __future__ import annotations

from pathlib import Path

ROOMS = ("kernels", "cluster", "prefill_worker", "decode_worker", "deploy", "bench")

_here = Path(__file__).resolve().parent
if not (_here / "kernels").is_dir() and (_here.parent / "kernels" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # a source tree: the rooms sit beside this folder

__version__ = "0.1.0"
