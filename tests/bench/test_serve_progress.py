"""The plain-text progress bar used when tqdm is missing (as on the GPU machines)."""

from __future__ import annotations

import sys

from pdserve.bench.progress import Progress


def test_plain_bar_counts_requests_and_errors(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    bar = Progress(4, "disagg @ 2 req/s", every_s=0.0)
    assert bar._bar is None
    for ok in (True, False, True, True):
        bar.update(ok)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4  # not a terminal: one line per update when every_s is 0
    assert lines[0].startswith("disagg @ 2 req/s [" + "#" * 7 + "." * 23 + "] 1/4 ")
    assert lines[-1].startswith("disagg @ 2 req/s [" + "#" * 30 + "] 4/4 ")
    assert lines[-1].endswith(", 1 errors") and "errors" not in lines[0]
    assert (bar.done, bar.failed) == (4, 1)


def test_disabled_bar_prints_nothing_but_counts(capsys):
    bar = Progress(2, "x", enabled=False)
    bar.update(True)
    bar.update(False)
    bar.close()
    assert capsys.readouterr().err == ""
    assert (bar.done, bar.failed) == (2, 1)
