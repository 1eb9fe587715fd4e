"""The cluster over real HTTP on CPU: every topology's greedy tokens equal the single-process
engine's, with the official openai client and with raw SSE; concurrency leaves no KV block in
use; pools scale in place under streaming load without a failed request.

The tests of this module share one deployment and run in order: 1P1D, then 2P1D and 1P2D
(scaled in place), 2P2D and back under load, then colocated and TP=2 (deployed anew).
"""

from __future__ import annotations

import json
import random
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.e2e.conftest import GREEDY_TOKENS, App, app_args, deploy
from tests.hf_reference import hf_greedy

pytestmark = pytest.mark.slow

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a KV cache?"},
]


def _prompts(vocab: int, n: int, seed: int, hi: int = 150) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(1, hi))] for _ in range(n)]


def _sse(app: App, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        app.url + path,
        json.dumps({**body, "stream": True}).encode(),
        {"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _check_topology(app: App, reference, seed: int) -> None:
    """Greedy tokens through the app equal the single-process engine's, four ways."""
    engine = reference.engine
    client = openai.OpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0)
    extra = {"ignore_eos": True, "return_token_ids": True}
    prompts = _prompts(engine.vocab_size, 4, seed) + ["The expert router and the cache."]
    for prompt in prompts:
        ids = engine.tokenize(prompt)
        want = reference(ids)
        # official client, not streaming
        r = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=GREEDY_TOKENS, temperature=0, extra_body=extra
        )
        choice = r.choices[0]
        assert choice.token_ids == want and choice.prompt_token_ids == ids
        assert choice.text == engine.tokenizer.decode(want)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), GREEDY_TOKENS)
        # official client, streaming
        text, got = "", []
        for chunk in client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=GREEDY_TOKENS,
            temperature=0,
            stream=True,
            extra_body=extra,
        ):
            for c in chunk.choices:
                text += c.text
                got += c.token_ids or []
        assert got == want and text == choice.text
    # chat: the template applied, raw SSE with usage
    chat_ids = engine.tokenizer.apply_chat_template(CHAT)
    want = reference(chat_ids)
    body = {
        "model": "tiny",
        "messages": CHAT,
        "max_tokens": GREEDY_TOKENS,
        "temperature": 0,
        **extra,
    }
    status, r = app.post("/v1/chat/completions", body)
    assert status == 200, r
    assert r["prompt_token_ids"] == chat_ids and r["choices"][0]["token_ids"] == want
    assert r["usage"] == {
        "prompt_tokens": len(chat_ids),
        "completion_tokens": GREEDY_TOKENS,
        "total_tokens": len(chat_ids) + GREEDY_TOKENS,
    }
    events = _sse(app, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    got = [t for e in events for c in e["choices"] for t in c.get("token_ids") or []]
    content = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert got == want and content == r["choices"][0]["message"]["content"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == GREEDY_TOKENS


def _greedy(app: App, prompt: list[int], n: int = GREEDY_TOKENS) -> list[int]:
    """The ``n`` greedy token ids ``app`` returns for ``prompt`` (one non-streaming call)."""
    status, r = app.post(
        "/v1/completions",
        {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0,
         "ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert status == 200, r
    return r["choices"][0]["token_ids"]


def _blocks_free(app: App) -> dict[str, float]:
    def free(m):
        return all(
            m.get(f'pdserve_kv_blocks_used{{pool="{p}"}}', 0) == 0 for p in ("prefill", "decode")
        ) and all(
            m.get(f'pdserve_inflight_requests{{pool="{p}"}}', 0) == 0 for p in ("prefill", "decode")
        )

    return app.wait_metrics(free)


@pytest.fixture(scope="module")
def pd(ray_serve, tiny_model):
    decode = {"num_replicas": 1, "num_kv_blocks": 512, "max_num_seqs": 64}
    return deploy(
        ray_serve, app_args(tiny_model, {"num_replicas": 1, "num_kv_blocks": 512}, decode)
    )


def test_1p1d_matches_single_process(pd, reference):
    _check_topology(pd, reference, seed=1)
    m = _blocks_free(pd)
    assert m['pdserve_kv_transfers_total{pool="decode"}'] >= 7  # every request's KV moved
    # each prompt went twice: the second time the prefill replica had its full blocks cached
    hits = m['pdserve_prefix_cache_hits_total{pool="prefill"}']
    assert 0 < hits < m['pdserve_prefix_cache_queries_total{pool="prefill"}']


def test_32_concurrent_streams_complete_and_free_every_block(pd, reference):
    engine = reference.engine
    prompts = _prompts(engine.vocab_size, 32, seed=2, hi=300)
    lengths = [4 + (i * 7) % 29 for i in range(32)]

    def one(i: int) -> list[int]:
        body = {
            "model": "tiny",
            "prompt": prompts[i],
            "max_tokens": lengths[i],
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        return [
            t
            for e in _sse(pd, "/v1/completions", body)
            for c in e["choices"]
            for t in c.get("token_ids") or []
        ]

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    for i in range(32):
        assert got[i] == reference(prompts[i], lengths[i]), f"request {i}"
    m = _blocks_free(pd)
    assert m['pdserve_kv_blocks_total{pool="decode"}'] == 512
    assert m['pdserve_kv_blocks_free{pool="prefill"}'] == 512


def test_invalid_input_gets_named_4xx_and_serving_goes_on(pd, reference):
    cases = [
        (b"{not json", 400, "JSON"),
        (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "UTF-8"),
        ({"model": "nope", "prompt": "hi"}, 404, "nope"),
        ({"model": "tiny"}, 400, "prompt"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"model": "tiny", "prompt": [5, 10**7]}, 400, "vocabulary"),
        ({"model": "tiny", "prompt": [5] * 3000}, 400, "context"),
    ]
    for body, status, needle in cases:
        code, r = pd.post("/v1/completions", body)
        assert code == status, (body, r)
        assert needle.lower() in r["error"]["message"].lower(), (body, r)
    ids = reference.engine.tokenize("still serving")
    code, r = pd.post(
        "/v1/completions",
        {
            "model": "tiny",
            "prompt": ids,
            "max_tokens": GREEDY_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert code == 200 and r["choices"][0]["token_ids"] == reference(ids)


def _scale(app: App, prefill: int, decode: int) -> None:
    from pdserve.deploy import serve_app

    serve_app.scale(app.name, {"prefill": prefill, "decode": decode})
    deadline = __import__("time").monotonic() + 300
    while serve_app.replica_counts(app.name) != {"prefill": prefill, "decode": decode}:
        assert __import__("time").monotonic() < deadline, serve_app.replica_counts(app.name)
        __import__("time").sleep(0.5)
    # the registry sees the new replicas once they report
    app.wait_metrics(
        lambda m: (
            m.get('pdserve_replicas{pool="prefill"}') == prefill
            and m.get('pdserve_replicas{pool="decode"}') == decode
        ),
        timeout=60,
    )


@pytest.mark.parametrize("prefill, decode", [(2, 1), (1, 2)])
def test_2p1d_and_1p2d_match_single_process(pd, reference, prefill, decode):
    _scale(pd, prefill, decode)
    _check_topology(pd, reference, seed=3 + prefill)
    from pdserve.deploy import serve_app

    busy = [s for s in serve_app.replica_stats(pd.name) if s.requests.get("ok")]
    assert {s.pool for s in busy} == {"prefill", "decode"}
    # Serve spread the requests over the scaled pool's replicas
    scaled = "prefill" if prefill == 2 else "decode"
    assert sum(1 for s in busy if s.pool == scaled) == 2
    _scale(pd, 1, 1)


def test_scaling_1p1d_2p2d_1p1d_while_streaming_fails_nothing(pd, reference):
    engine = reference.engine
    prompts = _prompts(engine.vocab_size, 64, seed=5, hi=120)
    stop = threading.Event()
    results: list[tuple[int, list[int] | Exception]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            p = prompts[i % len(prompts)]
            body = {
                "model": "tiny",
                "prompt": p,
                "max_tokens": 16,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            try:
                got = [
                    t
                    for e in _sse(pd, "/v1/completions", body)
                    for c in e["choices"]
                    for t in c.get("token_ids") or []
                ]
            except Exception as e:  # noqa: BLE001 - recorded and asserted on below
                got = e
            with lock:
                results.append((i % len(prompts), got))
            i += 6

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        _scale(pd, 2, 2)
        _scale(pd, 1, 1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    failures = [(i, r) for i, r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
    assert len(results) >= 12
    for i, got in results:
        assert got == reference(prompts[i], 16), f"prompt {i}"
    _blocks_free(pd)


def test_colocated_matches_single_process(ray_serve, tiny_model, reference, pd):
    app = deploy(ray_serve, app_args(tiny_model, None, {"num_replicas": 2, "num_kv_blocks": 512}))
    _check_topology(app, reference, seed=7)
    m = _blocks_free(app)
    assert m.get('pdserve_kv_transfers_total{pool="decode"}', 0) == 0  # nothing moved
    assert m['pdserve_replicas{pool="decode"}'] == 2


@pytest.mark.parametrize("tp", [1, 2])
def test_p2p_transport_1p1d_matches_single_process(ray_serve, tiny_model, reference, tp):
    """kv_transport nccl: point to point through torch.distributed, over gloo on CPU. The
    decode replica calls the prefill replica, and its KV peers, over the prefill replica's
    direct line: at tp 1 the prefill engine runs in the replica's process (its KV peer answers
    on the line), at tp 2 in rank actors (their handles travel over the line), as do decode's."""
    pool = {"num_replicas": 1, "num_kv_blocks": 256, "tp": tp}
    args = app_args(tiny_model, dict(pool), dict(pool))
    app = deploy(ray_serve, {**args, "kv_transport": "nccl"})
    _check_topology(app, reference, seed=9)
    from pdserve.deploy import serve_app

    stats = serve_app.replica_stats(app.name)
    assert {s.kv_transport for s in stats} == {"nccl"}
    # the prefill calls went over the prefill replica's direct line, not through Serve
    (prefill,) = [s for s in stats if s.pool == "prefill"]
    assert prefill.line and prefill.line_calls >= 1, (prefill.line, prefill.line_calls)
    m = _blocks_free(app)
    assert m['pdserve_kv_transfers_total{pool="decode"}'] >= 7
    assert m['pdserve_line_calls_total{pool="prefill"}'] >= prefill.line_calls


@pytest.mark.parametrize(
    "prefill_tp, decode_tp, transport", [(2, 1, "nccl"), (1, 2, "object_store")]
)
def test_pools_of_unequal_tp_match_single_process(
    ray_serve, tiny_model, reference, prefill_tp, decode_tp, transport
):
    """Every rank keeps MLA's latent cache whole, so a prefill group of one size fills a decode
    group of another: point to point, one prefill rank serves both decode ranks, or one of two
    prefill ranks serves the decode rank; through the object store, rank 0's copy goes."""
    args = app_args(
        tiny_model,
        {"num_replicas": 1, "num_kv_blocks": 256, "tp": prefill_tp},
        {"num_replicas": 1, "num_kv_blocks": 256, "tp": decode_tp},
    )
    app = deploy(ray_serve, {**args, "kv_transport": transport})
    _check_topology(app, reference, seed=12)
    m = _blocks_free(app)
    assert m['pdserve_kv_transfers_total{pool="decode"}'] >= 7


def test_tp2_on_both_pools_matches_single_process(ray_serve, tiny_model, reference):
    pool = {"num_replicas": 1, "tp": 2, "num_kv_blocks": 256}
    app = deploy(ray_serve, app_args(tiny_model, dict(pool), dict(pool)))
    _check_topology(app, reference, seed=8)
    from pdserve.deploy import serve_app

    assert {s.tp for s in serve_app.replica_stats(app.name)} == {2}
    _blocks_free(app)


def test_conversations_bench_counts_what_the_prefix_caches_saved(
    ray_serve, tiny_model, tmp_path, capsys
):
    """`pdserve bench --conversations` on 1P2D: every turn answered; later turns find their
    history cached on the prefill replica, so fewer prompt tokens are computed than admitted;
    and Serve's router sends each later turn to the decode replica that ran the earlier ones,
    which holds their KV, so prefill sends only the blocks after it."""
    from pdserve.deploy.cli import build_parser

    decode = {"num_replicas": 2, "num_kv_blocks": 256}
    app = deploy(ray_serve, app_args(tiny_model, {"num_replicas": 1, "num_kv_blocks": 256}, decode))
    out = tmp_path / "conv.json"
    argv = [
        "bench", "--url", app.url, "--conversations", "3", "--turns", "3", "--system-len", "40",
        "--user-len", "8", "--output-len", "6", "--vocab-size", "1000", "--out", str(out),
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    assert args.fn(args) == 0
    result = json.loads(out.read_text())
    s = result["summary"]
    assert s["requests"] == 9 and s["failed"] == 0 and s["prompt_pool"] == "prefill"
    prompts = [r["input_len"] for r in result["records"]]
    assert prompts[:3] == [48, 62, 76]  # each turn: the last prompt, its 6 answers, 8 new
    assert s["prompt_tokens_admitted"] == 3 * (48 + 62 + 76)
    assert 0 < s["prompt_tokens_cached"] and s["prompt_tokens_computed"] < 3 * (48 + 62 + 76)
    # turn 2 finds turn 1's 53 tokens with KV (3 blocks of 16) on its decode replica, turn 3
    # turn 2's 67 (4 blocks); a turn 1 may find the 40-token system prompt's 2 blocks
    held = s["decode_prefix_tokens_held"]
    assert 3 * (48 + 64) <= held <= 3 * (48 + 64 + 32), held
    assert s["kv_bytes_moved"] > 0 and s["kv_bytes_held_by_decode"] > 0
    # blocks sent per conversation: turn 1 3 of 3 (or 1), turn 2 1 of 4, turn 3 1 of 5
    assert s["kv_bytes_fewer_x"] >= 12 / 5, s
    assert "prompt_tokens_computed" in capsys.readouterr().out
    _blocks_free(app)


def test_prompts_sharing_a_prefix_go_to_the_prefill_replica_that_caches_it(
    ray_serve, tiny_model, reference
):
    """2P1D over direct lines: a system prompt's later users follow the first to the prefill
    replica that computed it (both are idle, so load never outweighs the hit), and hit its
    cache; the tokens equal the single process's."""
    args = app_args(tiny_model, {"num_replicas": 2, "num_kv_blocks": 256}, {"num_kv_blocks": 256})
    app = deploy(ray_serve, {**args, "kv_transport": "nccl"})
    system = list(range(40, 120))
    for i in range(6):
        prompt = system + [200 + i, 201 + i, 202 + i]
        assert _greedy(app, prompt, 4) == reference(prompt, 4)
    m = _blocks_free(app)
    # 80 shared tokens: 5 full blocks of 16 found cached by each of the 5 later prompts
    assert m['pdserve_prefix_cache_hits_total{pool="prefill"}'] == 5 * 80


def test_fp8_checkpoint_served_1p1d_gives_transformers_tokens(
    ray_serve, fp8_model, fp8_model_dequantized
):
    """DeepSeek's release format (float8 E4M3 linears, 128x128 block scales), written by
    ``make-model --fp8``, deployed 1P1D in float32: transformers' greedy tokens on the
    dequantized weights. Prompts go one at a time, so no batch mixes float32 sums."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    args = app_args(fp8_model, {"num_replicas": 1, "num_kv_blocks": 128}, {"num_kv_blocks": 128})
    args["model"]["dtype"] = "float32"
    app = deploy(ray_serve, args)
    hf = DeepseekV3ForCausalLM.from_pretrained(fp8_model_dequantized, dtype=torch.float32).eval()
    for prompt in _prompts(1000, 3, seed=11, hi=90):
        want = hf_greedy(hf, prompt, GREEDY_TOKENS)
        assert _greedy(app, prompt) == want, f"prompt of {len(prompt)} tokens"
    _blocks_free(app)


def test_weights_drawn_at_load_serve_1p1d_like_their_checkpoint(ray_serve, tmp_path):
    """``model.random_weights_seed``: the preset's directory is made without weights, both
    pools draw them at load, and the tokens are those of the MXFP4 checkpoint of that seed."""
    from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, SamplingParams
    from pdserve.cluster.checkpoint_maker import make_model

    full = make_model(tmp_path / "full", "tiny", mxfp4=True, seed=3)
    ref = LLMEngine(
        EngineConfig(model=str(full), dtype="float64", cache=CacheConfig(block_size=16))
    )
    args = app_args(str(tmp_path / "bare"), {"num_kv_blocks": 128}, {"num_kv_blocks": 128})
    args["model"].update(preset="tiny", random_weights_seed=3)
    app = deploy(ray_serve, args)
    assert not list((tmp_path / "bare").glob("*.safetensors"))
    sp = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)
    for prompt in _prompts(ref.vocab_size, 3, seed=13, hi=60):
        assert _greedy(app, prompt) == ref.generate([prompt], sp)[0].token_ids
    _blocks_free(app)


@pytest.mark.parametrize("transport", ["object_store", "nccl"])
def test_gpt_oss_served_1p1d_gives_transformers_tokens(ray_serve, gpt_oss_model, transport):
    """A GPT-OSS checkpoint written by transformers (sliding layers of 6 tokens, random sinks
    and biases), deployed 1P1D in float32: transformers' greedy tokens, for prompts shorter and
    longer than the window, the KV moved by either transport. One prompt at a time."""
    import torch
    from transformers import GptOssForCausalLM

    args = app_args(gpt_oss_model, {"num_kv_blocks": 128}, {"num_kv_blocks": 128})
    args["model"].update(dtype="float32", block_size=4)
    app = deploy(ray_serve, {**args, "kv_transport": transport})
    hf = GptOssForCausalLM.from_pretrained(gpt_oss_model, dtype=torch.float32).eval()
    for prompt in ([7], [11, 12, 13, 14], list(range(20, 45))):  # window: 6 tokens
        want = hf_greedy(hf, prompt, GREEDY_TOKENS)
        assert _greedy(app, prompt) == want, f"prompt of {len(prompt)} tokens"
    _blocks_free(app)
