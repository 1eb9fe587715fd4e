"""A pair group's signal line: words arrive in order, a missing word times out within its
bound, a word for the wrong transfer is an error, and shutting the line wakes a waiting reader."""

from __future__ import annotations

import threading
import time

import pytest

from pdserve.cluster.kv_transport.signal_line import SignalLine


def _pair() -> tuple[SignalLine, SignalLine]:
    server = SignalLine.listen("127.0.0.1")
    port = server.getsockname()[1]
    made: dict[str, SignalLine] = {}
    joiner = threading.Thread(
        target=lambda: made.update(p=SignalLine.connect("127.0.0.1", port, 10.0))
    )
    joiner.start()
    decode = SignalLine.accept(server, 10.0)
    joiner.join(timeout=10)
    return made["p"], decode


def test_words_arrive_in_order_even_when_sent_together():
    prefill, decode = _pair()
    for i in range(50):
        prefill.send(f"t{i}", "ok" if i % 3 else "prefill KV dropped")
    got = [decode.receive(f"t{i}", 5.0) for i in range(50)]
    assert got == ["ok" if i % 3 else "prefill KV dropped" for i in range(50)]
    prefill.shut()
    decode.shut()


def test_timeout_a_word_that_never_comes():
    prefill, decode = _pair()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="t0"):
        decode.receive("t0", 0.3)
    assert time.monotonic() - t0 < 5.0
    prefill.shut()
    decode.shut()


def test_a_word_for_another_transfer_is_an_error():
    prefill, decode = _pair()
    prefill.send("t1", "ok")
    with pytest.raises(RuntimeError, match="out of order"):
        decode.receive("t0", 5.0)
    prefill.shut()
    decode.shut()


def test_shutting_the_line_wakes_a_waiting_reader():
    prefill, decode = _pair()
    got: dict[str, str] = {}
    reader = threading.Thread(target=lambda: got.update(w=decode.receive("t0", 30.0)))
    reader.start()
    time.sleep(0.2)
    decode.shut()
    reader.join(timeout=10)
    assert got == {"w": "closed"}
    prefill.shut()


def test_a_peer_that_goes_away_reads_as_closed():
    prefill, decode = _pair()
    prefill.shut()
    assert decode.receive("t0", 5.0) == "closed"
    decode.shut()
