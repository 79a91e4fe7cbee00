"""OpenAI routes on a real loopback server with the tiny model, through the official `openai` SDK.

Truth: the prompt the engine actually feeds the model (recorded by a model proxy) must equal
encode_messages / the official encoder's golden prompts, and the greedy text must equal a cold
stream_generate run outside the server (the oracle).
"""

from __future__ import annotations

import json

import httpx
import pytest
from server_util import RecordingModel, oracle, prompt_ids, start, tiny

openai = pytest.importorskip("openai")

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def srv():
    rec = RecordingModel(tiny()[0])
    with start(rec, max_tokens_limit=64, max_body_bytes=1 << 20) as s:
        s.rec = rec
        yield s


def client(s):
    return openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)


def cold(s):
    """Forget earlier requests: no snapshot reuse, empty call record."""
    s.engine.prefix.clear()
    s.rec.clear()


def test_models_and_health(srv):
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client(srv).models.list().data] == ["tiny"]
    assert client(srv).models.retrieve("anything").id == "anything"


def test_chat_and_streaming_equal_the_oracle(srv):
    ids = prompt_ids(HELLO)
    want, _ = oracle(ids, 6)
    c = client(srv)
    cold(srv)
    r = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
    assert srv.rec.fed[: len(ids)] == ids  # the prompt reached the model exactly as encoded
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 6)
    chunks = list(c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("extra, mode, effort", [
    ({}, "chat", None),  # the documented default: no thinking
    ({"reasoning_effort": "none"}, "chat", None),
    ({"reasoning_effort": "low"}, "thinking", "high"),
    ({"reasoning_effort": "medium"}, "thinking", "high"),
    ({"reasoning_effort": "high"}, "thinking", "high"),
    ({"reasoning_effort": "xhigh"}, "thinking", "max"),
    ({"reasoning_effort": "max"}, "thinking", "max"),
    ({"thinking": {"type": "enabled"}}, "thinking", "high"),
    ({"thinking": {"type": "enabled"}, "reasoning_effort": "max"}, "thinking", "max"),
    ({"thinking": {"type": "disabled"}, "reasoning_effort": "high"}, "chat", None),
])
def test_reasoning_switches_select_the_mode(srv, extra, mode, effort):
    ids = prompt_ids(HELLO, mode, effort)
    want, _ = oracle(ids, 3)
    cold(srv)
    msg = client(srv).chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0,
                                              extra_body=extra).choices[0].message
    assert srv.rec.fed[: len(ids)] == ids
    reasoning = msg.model_extra.get("reasoning_content") or ""
    if mode == "thinking":  # everything before </think> is reasoning
        head, _sep, tail = want.partition("</think>")
        assert (reasoning, msg.content or "") == (head, tail)
    else:
        assert (reasoning, msg.content) == ("", want)


def _golden_cases():
    from conftest import DATA

    path = DATA / "chat-golden.jsonl"
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        roles = {m["role"] for m in d.get("messages", [])}
        if (d["kind"] == "encode" and roles <= {"system", "user", "assistant", "tool"} and "drop_thinking" not in d
                and d.get("tools_message_index") in (None, 0)):
            out.append(d)
    return out


@pytest.mark.parametrize("case", _golden_cases(), ids=lambda d: d["name"])
def test_requests_encode_like_the_official_encoder(srv, case):
    """OpenAI requests (top-level tools and response_format) reach the model as the official prompt."""
    msgs = [dict(m) for m in case["messages"]]
    body = {"model": "tiny", "messages": msgs, "max_tokens": 1}
    if msgs[0]["role"] == "system":
        for k in ("tools", "response_format"):
            if k in msgs[0]:
                body[k] = msgs[0].pop(k)
    if case["thinking_mode"] == "chat":
        body["thinking"] = {"type": "disabled"}
    else:
        body["reasoning_effort"] = "max" if case["reasoning_effort"] == "max" else "high"
    cold(srv)
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    want = tiny()[1].encode(case["prompt"], add_special_tokens=False)
    assert srv.rec.fed[: len(want)] == want and r.json()["usage"]["prompt_tokens"] == len(want)


def test_stop_strings_and_logprobs(srv):
    ids = prompt_ids(HELLO)
    full, toks = oracle(ids, 8)
    stop = full[len(full) // 2 : len(full) // 2 + 2]  # a piece from the middle of the greedy text
    want, _ = oracle(ids, 8, stop=[stop])
    assert len(want) < len(full)  # the stop string cut it (else the test would show nothing)
    c = client(srv)
    r = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0, stop=[stop])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=0, logprobs=True,
                                  top_logprobs=3)
    lps = r.choices[0].logprobs.content
    assert len(lps) == 4
    for lp, t in zip(lps, toks):  # greedy: the chosen token is the most likely one
        assert lp.token == tiny()[1].decode([t]) and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].logprob == lp.logprob >= lp.top_logprobs[1].logprob >= lp.top_logprobs[2].logprob


def test_raw_completions(srv):
    ids = [0] + tiny()[1].encode("The capital of France is", add_special_tokens=False)
    want, _ = oracle(ids, 5)
    c = client(srv)
    r = c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].text == want and r.usage.prompt_tokens == len(ids)
    s = c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == want
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)  # token ids as given
    assert r.choices[0].text == want


def test_responses_api(srv):
    """Codex's wire format: same greedy text as chat; streamed events accumulate to the same output."""
    ids = prompt_ids([{"role": "system", "content": "Be brief."}] + HELLO)
    want, _ = oracle(ids, 5)
    c = client(srv)
    r = c.responses.create(model="tiny", instructions="Be brief.", input="Hello there", max_output_tokens=5,
                           temperature=0)
    assert r.output_text == want and r.status == "incomplete" and r.usage.input_tokens == len(ids)
    kinds, text = [], ""
    for ev in c.responses.create(model="tiny", instructions="Be brief.",
                                 input=[{"role": "user", "content": "Hello there"}],
                                 max_output_tokens=5, temperature=0, stream=True):
        kinds.append(ev.type)
        text += ev.delta if ev.type == "response.output_text.delta" else ""
    assert text == want
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"
    assert kinds[1:4] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]


def test_prefix_completion_continues_the_last_assistant_message(srv):
    msgs = HELLO + [{"role": "assistant", "content": "Well, I"}]
    ids = prompt_ids(msgs)[:-1]  # without the closing EOS
    want, _ = oracle(ids, 4)
    cold(srv)
    r = client(srv).chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                            messages=HELLO + [dict(msgs[1], prefix=True)])
    assert srv.rec.fed[: len(ids)] == ids and r.choices[0].message.content == want
    bad = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [dict(HELLO[0], prefix=True)]})
    assert bad.status_code == 400 and "prefix" in bad.json()["error"]["message"]
