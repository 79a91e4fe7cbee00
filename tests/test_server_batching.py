"""The server's scheduler: concurrent requests decoded together, each with its own parameters.

Truth: each request's solo run (stream_generate outside the server, cold cache). A recording model
shows that requests really shared decode steps (a step feeding several rows at once).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_util import RecordingModel, oracle, prompt_ids, start, tiny

from mlx_dsv4.generate import stream_generate

openai = pytest.importorskip("openai")


class BatchRecorder(RecordingModel):
    """Also records the number of rows of each forward call."""

    def __init__(self, model):
        super().__init__(model)
        self.rows: list[int] = []

    def __call__(self, x, *a, **kw):
        self.rows.append(x.shape[0])
        return super().__call__(x, *a, **kw)


@pytest.fixture(scope="module")
def srv():
    rec = BatchRecorder(tiny()[0])
    with start(rec, max_tokens_limit=1000, max_batch=4) as s:
        s.rec = rec
        yield s


def client(s):
    return openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)


def solo(ids, **kw):
    model, tok = tiny()
    return list(stream_generate(model, tok, ids, **kw))


def test_concurrent_requests_keep_their_own_parameters(srv):
    """Greedy, seeded sampling, a stop string and logprobs side by side: each equals its solo run,
    and the steps fed several rows at once (max_batch 4, six requests: two waited)."""
    msgs = [[{"role": "user", "content": f"Tell me about topic {i}"}] for i in range(6)]
    ids = [prompt_ids(m) for m in msgs]
    greedy_text, _ = oracle(ids[0], 8)
    stop_word = greedy_text[3:6]  # a stop string the greedy text meets early
    kws = [dict(temperature=0.0), dict(temperature=0.0, stop=[stop_word]), dict(temperature=1.5, seed=11),
           dict(temperature=1.5, seed=12), dict(temperature=0.0), dict(temperature=1.5, seed=11, top_p=0.8)]
    prompts = [ids[0], ids[0], ids[2], ids[2], ids[4], ids[5]]
    want = ["".join(r.text for r in solo(p, max_tokens=8, **k)) for p, k in zip(prompts, kws)]
    want_lp = [r.logprob for r in solo(prompts[4], max_tokens=8, temperature=0.0)]

    def run(i):
        k = dict(kws[i])
        body = {"prompt": prompts[i], "max_tokens": 8, **k}
        if i == 4:
            body["logprobs"] = 2
        return httpx.post(srv.url + "/v1/completions", json=body, timeout=120).json()

    srv.rec.rows.clear()
    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(run, range(6)))
    assert [g["choices"][0]["text"] for g in got] == want
    assert want[1] == greedy_text[: greedy_text.index(stop_word)]  # the stop string cut it
    assert want[2] != want[3]  # the seeds matter (control for the seeded rows)
    lp = got[4]["choices"][0]["logprobs"]["token_logprobs"]
    assert len(lp) == 8 and max(abs(a - b) for a, b in zip(lp, want_lp)) < 2e-3  # test_batch.GEN_TOL
    assert max(srv.rec.rows) >= 2  # some decode steps served several requests at once
    assert max(srv.rec.rows) <= 4  # never more rows than --max-batch


def test_eight_concurrent_greedy_chats_equal_solo_and_a_disconnect_leaves_them_exact(srv):
    prompts = [[{"role": "user", "content": f"Question number {i}"}] for i in range(8)]
    want = [oracle(prompt_ids(m), 6)[0] for m in prompts]
    long = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 1000,
            "temperature": 0, "stream": True}

    def leaver():  # streams a few tokens then goes away, while the others run
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long, timeout=60) as r:
            seen = 0
            for line in r.iter_lines():
                seen += '"content"' in line
                if seen >= 4:
                    return seen

    def run(m):
        r = client(srv).chat.completions.create(model="tiny", messages=m, max_tokens=6, temperature=0)
        return r.choices[0].message.content

    srv.engine.prefix.clear()
    with ThreadPoolExecutor(9) as ex:
        gone = ex.submit(leaver)
        got = list(ex.map(run, prompts))
        assert gone.result() >= 4
    assert got == want
    # the server is still fine and nothing is left running
    assert client(srv).chat.completions.create(model="tiny", messages=prompts[0], max_tokens=6,
                                               temperature=0).choices[0].message.content == want[0]


def test_admission_holds_requests_whose_caches_exceed_the_budget():
    """A budget of one request's cache bytes: requests run one at a time, in order, still exact."""
    rec = BatchRecorder(tiny()[0])
    msgs = [[{"role": "user", "content": f"Budget test {i}"}] for i in range(3)]
    ids = [prompt_ids(m) for m in msgs]
    with start(rec, max_tokens_limit=1000, max_batch=8, batch_cache_bytes=1) as s:
        need = s.engine.row_bytes(len(ids[0]) + 5)
        assert need > 1 and s.engine.admits(type("P", (), {"ids": ids[0], "max_tokens": 5})(), []) is False
        with ThreadPoolExecutor(3) as ex:
            got = list(ex.map(lambda m: client(s).chat.completions.create(
                model="tiny", messages=m, max_tokens=5, temperature=0).choices[0].message.content, msgs))
    assert got == [oracle(p, 5)[0] for p in ids]
    assert max(rec.rows) == 1  # never two rows in one step
    # control: with room for all three, they do share steps
    rec2 = BatchRecorder(tiny()[0])
    with start(rec2, max_tokens_limit=1000, max_batch=8) as s:
        barrier = threading.Barrier(3)

        def run(m):
            barrier.wait()
            return client(s).chat.completions.create(model="tiny", messages=m, max_tokens=5,
                                                     temperature=0).choices[0].message.content

        with ThreadPoolExecutor(3) as ex:
            assert list(ex.map(run, msgs)) == got
    assert max(rec2.rows) >= 2


def test_close_lets_the_requests_in_flight_finish():
    """Engine.close() after submissions: every job still ends (its DONE arrives), none is dropped."""
    from mlx_dsv4.server.engine import DONE, Engine

    model, tok = tiny()
    eng = Engine(model, tok, max_batch=2)
    ends, events = [], {}
    ids = [prompt_ids([{"role": "user", "content": f"close {i}"}]) for i in range(3)]
    for i, p in enumerate(ids):
        events[i] = []
        eng.submit(p, {"max_tokens": 4, "temperature": 0.0},
                   lambda item, i=i: ends.append(i) if item is DONE else events[i].append(item))
    eng.close()
    assert not eng.thread.is_alive() and sorted(ends) == [0, 1, 2]
    assert ["".join(r.text for r in events[i]) for i in range(3)] == [oracle(p, 4)[0] for p in ids]
