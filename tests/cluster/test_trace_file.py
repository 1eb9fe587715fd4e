"""The hand-off trace records: written only when PDSERVE_KV_TRACE names a folder, one JSON line
per call, into a file per process."""

from __future__ import annotations

import json
import os

from pdserve.cluster import trace_file


def test_nothing_is_written_unless_a_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(trace_file.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert not trace_file.enabled()
    trace_file.record("decode peer", "t0", {"posted": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_records_are_json_lines_in_a_file_per_process(tmp_path, monkeypatch):
    folder = tmp_path / "trace"
    monkeypatch.setenv(trace_file.ENV, str(folder))
    assert trace_file.enabled()
    trace_file.record("prefill peer", "a/1", {"staged": 1.5, "sent": 2.0})
    trace_file.record("decode peer", "a/1", {"received": 2.5})
    lines = (folder / f"{os.getpid()}.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"side": "prefill peer", "tid": "a/1", "t": {"staged": 1.5, "sent": 2.0}},
        {"side": "decode peer", "tid": "a/1", "t": {"received": 2.5}},
    ]
    # another folder: the next record goes there, not to the file still open
    other = tmp_path / "other"
    monkeypatch.setenv(trace_file.ENV, str(other))
    trace_file.record("decode replica", "b/1", {"answered": 3.0})
    assert len((folder / f"{os.getpid()}.jsonl").read_text().splitlines()) == 2
    assert json.loads((other / f"{os.getpid()}.jsonl").read_text())["tid"] == "b/1"


def test_watched_collections_are_written_before_the_next_record(tmp_path, monkeypatch):
    """With tracing on, a collection that held the process at least GC_MIN_S becomes a "gc"
    record (its generation in the id, start before stop) ahead of the next transfer's."""
    import gc

    monkeypatch.setenv(trace_file.ENV, str(tmp_path))
    monkeypatch.setattr(trace_file, "GC_MIN_S", 0.0)  # every collection counts here
    trace_file.watch_gc()
    trace_file.watch_gc()  # once is enough: a second call adds nothing
    try:
        assert gc.callbacks.count(trace_file._on_gc) == 1
        gc.collect()
        trace_file.record("decode peer", "c/1", {"received": 4.0})
    finally:
        gc.callbacks.remove(trace_file._on_gc)
    records = [json.loads(x) for x in (tmp_path / f"{os.getpid()}.jsonl").read_text().splitlines()]
    pauses = [r for r in records if r["side"] == "gc"]
    assert pauses and records[-1]["tid"] == "c/1"
    assert any(r["tid"].startswith(f"gc2/{os.getpid()}/") for r in pauses)  # the full one
    assert all(0 <= r["t"]["stop"] - r["t"]["start"] < 60 for r in pauses)


def test_nothing_is_watched_unless_tracing_is_on(monkeypatch):
    import gc

    monkeypatch.delenv(trace_file.ENV, raising=False)
    trace_file.watch_gc()
    assert trace_file._on_gc not in gc.callbacks
