"""API keys: where they come from, the 401s, what stays open, and that no key is ever shown."""

from __future__ import annotations

import hmac
import logging

import httpx
import openai
import pytest
from pydantic import ValidationError

from pdserve.deploy.api_keys import ENV, APIKeys, keys_from_env
from pdserve.deploy.app import build_app
from pdserve.deploy.ingress_settings import IngressSettings
from pdserve.deploy.schema import AppSpec
from tests.deploy.conftest import BASE_URL, MODEL, client, error_of, run

KEYS = ("sk-first-0123456789", "sk-second-abcdef")
COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 1}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def keyed_app(served):
    return served.app(api_keys=KEYS)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_401(r, needle: str) -> None:
    assert r.status_code == 401, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"
    assert needle in err["message"], err
    assert r.headers["www-authenticate"] == "Bearer"
    assert not any(k in r.text for k in KEYS)


@pytest.mark.parametrize(
    "headers, needle",
    [
        ({}, "needs an API key"),
        (bearer("sk-wrong"), "not valid"),
        (bearer(KEYS[0] + "x"), "not valid"),
        (bearer(KEYS[0][:-1]), "not valid"),
        ({"x-api-key": "sk-wrong"}, "not valid"),
        ({"Authorization": f"Basic {KEYS[0]}"}, "must be 'Bearer <API key>'"),
        ({"Authorization": "Bearer "}, "must be 'Bearer <API key>'"),
        ({"Authorization": "Bearer \u00e9t\u00e9".encode("latin-1")}, "not valid"),
    ],
    ids=["none", "wrong", "longer", "prefix", "x-api-key", "basic", "empty", "latin-1"],
)
def test_requests_without_a_valid_key_get_401(keyed_app, headers, needle):
    async def go():
        async with client(keyed_app) as c:
            return [
                await c.post("/v1/completions", json=COMPLETION, headers=headers),
                await c.post("/v1/chat/completions", json=CHAT, headers=headers),
                await c.get("/v1/models", headers=headers),
                await c.get("/metrics", headers=headers),
                await c.get("/openapi.json", headers=headers),
                await c.get("/v2/no-such-route", headers=headers),  # 401, not 404: no map
                await c.put("/v1/completions", headers=headers),
            ]

    for r in run(go()):
        assert_401(r, needle)


@pytest.mark.parametrize(
    "headers",
    [
        bearer(KEYS[0]),
        bearer(KEYS[1]),
        {"Authorization": f"bearer  {KEYS[1]} "},
        {"x-api-key": KEYS[0]},
        {"Authorization": "Basic dXNlcjpwdw==", "x-api-key": KEYS[1]},  # a proxy's own auth
        {"Authorization": "Bearer sk-wrong", "x-api-key": KEYS[0]},
    ],
    ids=["first", "second", "case-and-spaces", "x-api-key", "basic+x-api-key", "either"],
)
def test_a_valid_key_opens_every_route(keyed_app, headers):
    async def go():
        async with client(keyed_app) as c:
            return {
                "completion": await c.post("/v1/completions", json=COMPLETION, headers=headers),
                "chat": await c.post("/v1/chat/completions", json=CHAT, headers=headers),
                "models": await c.get("/v1/models", headers=headers),
                "metrics": await c.get("/metrics", headers=headers),
                "openapi": await c.get("/openapi.json", headers=headers),
                "unknown": await c.get("/v2/no-such-route", headers=headers),
            }

    out = run(go())
    assert out["completion"].json()["usage"]["completion_tokens"] == 1
    assert out["chat"].json()["usage"]["completion_tokens"] == 1
    assert out["models"].json()["data"][0]["id"] == MODEL
    assert out["metrics"].text.startswith("pdserve_engine_steps_total ")
    assert out["openapi"].json()["security"] == [{"bearer": []}, {"apiKey": []}]
    assert out["unknown"].status_code == 404


def test_health_stays_open_but_shows_detail_only_with_a_key(served, keyed_app):
    async def go():
        async with client(keyed_app) as c:
            out = [await c.get("/health"), await c.get("/health", headers=bearer(KEYS[1]))]
            served.health[0] = False
            try:
                out += [await c.get("/health"), await c.get("/health", headers=bearer("no"))]
                out += [await c.get("/health", headers=bearer(KEYS[0]))]
            finally:
                served.health[0] = True
            return out

    anonymous, keyed, down, down_wrong, down_keyed = run(go())
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    assert keyed.json() == {"status": "ok", "decode": {"live": 1}}
    assert down.status_code == down_wrong.status_code == down_keyed.status_code == 503
    assert down.json() == down_wrong.json() == {"status": "unavailable"}
    assert down_keyed.json() == {"status": "unavailable", "decode": {"live": 1}}


def test_the_open_route_is_found_under_a_route_prefix(keyed_app):
    """Serve mounts the app under its route prefix: the guard matches paths as the router."""

    async def go():
        transport = httpx.ASGITransport(app=keyed_app, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
            return [
                await c.get("/api/health"),
                await c.get("/api/v1/models"),
                await c.get("/api/v1/models", headers=bearer(KEYS[0])),
                await c.get("/apihealth"),
            ]

    health, models, keyed, glued = run(go())
    assert health.json() == {"status": "ok"}
    assert_401(models, "needs an API key")
    assert keyed.json()["data"][0]["id"] == MODEL
    assert_401(glued, "needs an API key")


def test_the_body_of_a_request_without_a_key_is_never_read(keyed_app):
    pulled = []

    async def body():
        for i in range(1000):
            pulled.append(i)
            yield b"x" * 65536

    async def go():
        async with client(keyed_app) as c:
            return await c.post("/v1/completions", content=body())

    assert_401(run(go()), "needs an API key")
    assert len(pulled) <= 1  # the transport may hand over the first chunk with the headers


def test_the_official_client_sends_its_key(keyed_app):
    async def go():
        async with client(keyed_app) as http:
            good = openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key=KEYS[1], http_client=http)
            done = await good.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
            bad = openai.AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key="sk-no", http_client=http)
            with pytest.raises(openai.AuthenticationError, match="not valid"):
                await bad.models.list()
            return done

    assert run(go()).usage.completion_tokens == 2


def test_every_key_is_compared_in_constant_time(monkeypatch):
    keys = APIKeys(["a1", "b2", "c3", "d4"])
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for candidate, valid in [("a1", True), ("d4", True), ("zz", False), ("a" * 500, False)]:
        calls.clear()
        assert keys.matches(candidate) is valid
        assert len(calls) == 4, "no early exit on a match"
        assert set(calls) == {(32, 32)}, "digests: equal lengths, whatever the key's length"
    assert repr(keys) == "APIKeys(4 keys)" and not APIKeys([]).enabled


def test_keys_from_the_environment():
    assert keys_from_env({}) == ()
    assert keys_from_env({ENV: ""}) == ()
    assert keys_from_env({ENV: " sk-a , sk-b,,sk-c, "}) == ("sk-a", "sk-b", "sk-c")
    with pytest.raises(ValueError, match=f"{ENV} entry 1 may hold only visible ASCII") as e:
        keys_from_env({ENV: "sk-a,sk b-secret"})
    assert "secret" not in str(e.value)
    settings = IngressSettings("m", "/tmp", 64, api_keys=("sk-yaml",))
    both = settings.with_env_keys({ENV: "sk-env1,sk-env2"})
    assert both.api_keys == ("sk-yaml", "sk-env1", "sk-env2")
    assert settings.with_env_keys({}).api_keys == ("sk-yaml",)


@pytest.mark.parametrize(
    "keys, needle",
    [
        (("",), "api_keys[0] is empty"),
        (("ok", "with space-secret"), "api_keys[1] may hold only"),
        (("comma,secret",), "api_keys[0] may hold only"),
        (("tab\tsecret",), "api_keys[0] may hold only"),
        (("ünïcödé-secret",), "api_keys[0] may hold only"),
        (["list-secret"], "must be a tuple"),
    ],
)
def test_bad_keys_are_refused_without_showing_them(keys, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")) as e:
        IngressSettings("m", "/tmp", 64, api_keys=keys)
    assert "secret" not in str(e.value)


def test_settings_and_the_yaml_never_show_keys(tiny_model, caplog):
    settings = IngressSettings("m", "/tmp", 64, api_keys=KEYS)
    assert not any(k in repr(settings) or k in str(settings) for k in KEYS)
    spec = AppSpec.model_validate({"model": {"path": tiny_model}, "ingress": {"api_keys": KEYS}})
    shown = [repr(spec), str(spec), spec.model_dump_json(), str(spec.model_dump(mode="json"))]
    assert not any(k in s for s in shown for k in KEYS)
    bad = {"model": {"path": tiny_model}, "ingress": {"api_keys": ["sk-good", "sk bad-secret"]}}
    with pytest.raises(ValidationError, match="api_keys.1") as e:
        AppSpec.model_validate(bad)
    assert "secret" not in str(e.value) and "sk-good" not in str(e.value)
    with pytest.raises(ValidationError, match="valid list") as e:
        AppSpec.model_validate({**bad, "ingress": {"api_keys": "sk-single-secret"}})
    assert "secret" not in str(e.value)
    # the builder hands the keys, and the other ingress limits, to the ingress
    with caplog.at_level(logging.DEBUG):
        args = {"model": {"path": tiny_model}, "prefill": None}
        args["ingress"] = {"api_keys": list(KEYS), "max_choices": 9, "prompt_special_tokens": False}
        app = build_app(args)
    built = app._bound_deployment.init_args[1]
    assert isinstance(built, IngressSettings) and built.api_keys == KEYS
    assert built.max_choices == 9 and built.prompt_special_tokens is False
    assert not any(k in caplog.text for k in KEYS)
