"""The hand-off trace records: written only when PDSERVE_KV_TRACE names a folder, one JSON line
per call, into a file per process."""

from __future__ import annotations

import json
import os

from cluster import trace_file


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
