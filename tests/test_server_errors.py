"""Bad input on every route: a 4xx JSON error in the API's own format, never a 5xx or a hang.

Hand-written cases for each kind of mistake (with the field named in the message), the API key
on every route, body and context limits, then a hypothesis fuzz of random and mutated bodies
against the real engine.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from server_util import HELLO, ROUTES, VALID, start



@pytest.fixture(scope="module")
def srv():
    with start(max_tokens_limit=3, max_body_bytes=64 << 10, max_context=128) as s:
        yield s


def post(s, route, body=None, content=None, **kw):
    return httpx.post(s.url + route, json=body, content=content, timeout=30, **kw)


def assert_error(r, route, status=400, mentions: str | None = None):
    assert r.status_code == status, (route, r.status_code, r.text[:300])
    j = r.json()
    if route.startswith("/v1/messages"):
        assert j["type"] == "error" and isinstance(j["error"]["message"], str) and j["error"]["type"], j
        message = j["error"]["message"]
    else:
        assert isinstance(j["error"]["message"], str) and j["error"]["type"] == "invalid_request_error", j
        message = j["error"]["message"]
    if mentions:
        assert mentions in message, message


@pytest.mark.parametrize("route", ROUTES)
def test_malformed_bodies(srv, route):
    assert_error(post(srv, route, content=b"{not json"), route, mentions="malformed JSON")
    assert_error(post(srv, route, content=b'{"max_tokens": NaN}'), route, mentions="NaN")
    assert_error(post(srv, route, content=b"[" * 50_000), route, mentions="malformed JSON")  # nesting too deep
    assert_error(post(srv, route, content=b'["a list"]'), route, mentions="JSON object")
    assert_error(post(srv, route, content=b"\xff\xfe"), route)
    assert post(srv, route, VALID[route]).status_code == 200  # the reference body itself is fine


@pytest.mark.parametrize("route, body, mentions", [
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "wizard"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 4}, "max_tokens"),  # above the limit of 3
    ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"messages": HELLO, "seed": -1}, "seed"),
    ("/v1/chat/completions", {"messages": HELLO, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": HELLO, "tools": {"a": 1}}, "tools"),
    ("/v1/chat/completions", {"messages": HELLO, "tools": [{"type": "function"}]}, "tools[0]"),
    ("/v1/chat/completions", {"messages": HELLO, "reasoning_effort": "huge"}, "reasoning_effort"),
    ("/v1/chat/completions", {"messages": HELLO, "thinking": {"type": "sometimes"}}, "thinking"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 2}, "n must be 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "video"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "name"),
    ("/v1/chat/completions", {"messages": HELLO, "model": 7}, "model"),
    ("/v1/completions", {"prompt": 42}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, "prompt"),
    ("/v1/responses", {"input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
    ("/v1/responses", {"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ("/v1/messages", {"messages": HELLO}, "max_tokens"),
    ("/v1/messages", {"messages": [{"role": "system", "content": "x"}], "max_tokens": 1}, "role"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "tool_use", "name": "f"}]}],
                      "max_tokens": 1}, "tool_use"),
    ("/v1/messages", {"messages": HELLO, "max_tokens": 1, "temperature": 1.5}, "temperature"),
    ("/v1/messages", {"messages": HELLO, "max_tokens": 1, "thinking": {"type": "on"}}, "thinking"),
    ("/v1/messages", {"messages": HELLO, "max_tokens": 1, "output_config": {"effort": "extreme"}}, "effort"),
    ("/v1/messages/count_tokens", {"messages": HELLO, "tools": [{"input_schema": {}}]}, "tools.0.name"),
])
def test_wrong_fields_are_named(srv, route, body, mentions):
    assert_error(post(srv, route, body), route, mentions=mentions)


@pytest.mark.parametrize("route", ROUTES)
def test_limits(srv, route):
    big = {"messages": [{"role": "user", "content": "x" * (70 << 10)}]}
    assert_error(post(srv, route, big), route, 413, "exceeds the limit")  # declared length
    chunks = (b'{"messages": "' if i == 0 else b"x" * 4096 for i in range(20))  # no content-length: counted
    assert_error(post(srv, route, content=chunks), route, 413, "exceeds the limit")
    long = {k: v for k, v in VALID[route].items()}
    text = "many words " * 100  # ~200 tokens > the 128-token context of this server
    long.update({"prompt": text} if "prompt" in long else {"input": text} if "input" in long
                else {"messages": [{"role": "user", "content": text}]})
    assert_error(post(srv, route, long), route, 400, "context limit")


def test_unknown_routes_and_methods(srv):
    assert_error(httpx.get(srv.url + "/v1/nothing"), "/v1/nothing", 404)
    assert_error(httpx.get(srv.url + "/v1/messages"), "/v1/messages", 405)
    assert_error(httpx.get(srv.url + "/docs"), "/docs", 404)


def test_api_key_on_every_route():
    with start(api_key="sesame") as s:
        paths = [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/openapi.json"), ("GET", "/v1/nothing")]
        paths += [("POST", r) for r in ROUTES]
        for method, path in paths:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
                r = httpx.request(method, s.url + path, headers=headers, json=VALID.get(path))
                assert r.status_code == 401, (path, headers)
                j = r.json()
                assert (j["error"]["type"] == "authentication_error" if path.startswith("/v1/messages")
                        else j["error"]["code"] == "invalid_api_key")
        for headers in ({"authorization": "Bearer sesame"}, {"x-api-key": "sesame"}):
            assert httpx.get(s.url + "/health", headers=headers).status_code == 200
            assert post(s, "/v1/messages/count_tokens", VALID["/v1/messages/count_tokens"],
                        headers=headers).status_code == 200
        openai = pytest.importorskip("openai")
        anthropic = pytest.importorskip("anthropic")
        assert openai.OpenAI(base_url=s.url + "/v1", api_key="sesame").models.list().data[0].id == "tiny"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()
        an = anthropic.Anthropic(base_url=s.url, api_key="sesame")
        assert an.messages.count_tokens(model="tiny", messages=HELLO).input_tokens > 0


# -- fuzz -------------------------------------------------------------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=12),
                     lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=8), x, max_size=3),
                     max_leaves=12)
_FIELDS = ["messages", "prompt", "input", "instructions", "system", "max_tokens", "max_completion_tokens",
           "max_output_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_sequences", "stream",
           "stream_options", "n", "logprobs", "top_logprobs", "tools", "tool_choice", "reasoning_effort", "reasoning",
           "thinking", "output_config", "response_format", "text", "model", "echo", "repetition_penalty"]
_ROLES = st.sampled_from(["user", "assistant", "system", "developer", "tool", "robot", None, 3])
_BLOCKS = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking",
                                                          "input_text", "image_url", "bogus"])},
                                optional={"text": _json, "name": _json, "input": _json, "content": _json,
                                          "tool_use_id": _json, "id": _json, "thinking": _json})
_MESSAGES = st.lists(st.fixed_dictionaries({"role": _ROLES}, optional={
    "content": st.one_of(st.text(max_size=20), st.lists(_BLOCKS, max_size=3), _json),
    "tool_calls": _json, "tool_call_id": _json, "reasoning_content": _json}), max_size=3)


@st.composite
def _bodies(draw):
    route = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 4)) == 0:
        return route, draw(_json)  # anything at all
    body = dict(VALID[route])  # a valid body with some fields replaced by random values
    for key in draw(st.lists(st.sampled_from(_FIELDS), max_size=3)):
        body[key] = draw(_MESSAGES if key == "messages" else _json)
    return route, body


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_bodies())
def test_fuzz_no_5xx_no_hang(srv, case):
    route, body = case
    r = httpx.post(srv.url + route, content=json.dumps(body).encode(), timeout=30)  # a hang fails here
    assert r.status_code < 500, (route, body, r.text[:300])
    event(f"{route} {r.status_code}")
    if r.status_code >= 400:
        assert_error(r, route, r.status_code)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "server_error" not in r.text and "api_error" not in r.text and "response.failed" not in r.text
