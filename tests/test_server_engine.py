"""The model-owning engine behind the HTTP server: prefix reuse, concurrency, cancellation, threads.

Truths: the greedy text of a cold stream_generate run (oracle); the exact token ids the model was
fed (a recording proxy), against the prefix the test computes on its own; job end states.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import pytest
from server_util import RecordingModel, oracle, prompt_ids, start, tiny

from mlx_dsv4.server.engine import PrefixCache

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def srv():
    rec = RecordingModel(tiny()[0])
    with start(rec, max_tokens_limit=1000) as s:
        s.rec = rec
        s.jobs = []
        submit = s.engine.submit

        def recording_submit(*a, **kw):  # keep each job and the queue length it found
            job = submit(*a, **kw)
            s.jobs.append((job, s.engine.pending))
            return job

        s.engine.submit = recording_submit
        yield s


def chat(s, messages, n, **kw):
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
    return c.chat.completions.create(model="tiny", messages=messages, max_tokens=n, temperature=0, **kw)


def test_second_turn_prefills_only_the_new_suffix(srv):
    srv.engine.prefix.clear()
    turn1 = [{"role": "system", "content": "You are a careful assistant. " * 4}, {"role": "user", "content": "One?"}]
    p1 = prompt_ids(turn1)
    _, gen1 = oracle(p1, 4)
    r1 = chat(srv, turn1, 4)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "Two?"}]
    p2 = prompt_ids(turn2)
    want, gen2 = oracle(p2, 3)
    # what turn 1 left behind: snapshots of the prompt but its last token, and of prompt + reply but its last token
    held = [p1[:-1], (p1 + gen1)[:-1]]
    expect = max(len(h) for h in held if len(h) < len(p2) and p2[: len(h)] == h)
    srv.rec.clear()
    r2 = chat(srv, turn2, 3)
    assert r2.usage.prompt_tokens_details.cached_tokens == expect >= len(p1) - 1
    # the model saw only the uncached suffix, then the generated tokens but the last
    assert srv.rec.fed == p2[expect:] + gen2[:-1]
    assert r2.choices[0].message.content == want  # resuming a snapshot changes nothing


def test_eight_concurrent_streams_equal_solo_runs(srv):
    prompts = [[{"role": "user", "content": f"Question number {i}"}] for i in range(8)]
    solo = [oracle(prompt_ids(m), 5)[0] for m in prompts]

    def run(m):
        return "".join(ch.choices[0].delta.content or "" for ch in chat(srv, m, 5, stream=True) if ch.choices)

    srv.engine.prefix.clear()
    srv.jobs.clear()
    srv.rec.clear()
    with ThreadPoolExecutor(8) as ex:
        together = list(ex.map(run, prompts))
    assert together == solo
    assert max(q for _, q in srv.jobs) >= 2  # requests really overlapped: jobs waited in the queue
    assert {t for _, t in srv.rec.calls} == {"mlx-dsv4-engine"}  # every MLX call on the engine's thread


def _wait_job(s, k):
    job = s.jobs[k][0]
    assert job.done.wait(60)
    return job


# Greedy, this prompt runs 200+ tokens without EOS; 1000 tokens take ~20 s here. A job that ends
# "cancelled" was stopped by the disconnect (EOS or the length limit would say "stop" / "length").
STORY = [{"role": "user", "content": "Tell me a long story"}]


def test_disconnect_cancels_a_streaming_generation(srv):
    srv.jobs.clear()
    body = {"messages": STORY, "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += '"content"' in line
            if seen >= 3:
                break  # leave after a few tokens
    job = _wait_job(srv, 0)
    assert job.finish_reason == "cancelled"


def test_disconnect_cancels_a_waiting_and_a_running_request(srv):
    """A non-streaming client that times out cancels its job, queued or running."""
    srv.jobs.clear()
    long = {"messages": STORY, "max_tokens": 1000, "temperature": 0}
    with ThreadPoolExecutor(2) as ex:
        first = ex.submit(httpx.post, srv.url + "/v1/chat/completions", json=long, timeout=1.5)
        while len(srv.jobs) < 1:
            threading.Event().wait(0.01)
        second = ex.submit(httpx.post, srv.url + "/v1/chat/completions", json=long, timeout=1.0)
        for f in (first, second):
            with pytest.raises(httpx.ReadTimeout):
                f.result()
    assert _wait_job(srv, 0).finish_reason == "cancelled"  # stopped mid-generation
    assert _wait_job(srv, 1).finish_reason in ("skipped", "cancelled")  # never ran, or stopped at once
    # the server is still fine
    assert chat(srv, [{"role": "user", "content": "Hi"}], 2).usage.completion_tokens == 2


# -- PrefixCache on its own ---------------------------------------------------------------------
class FakeLayer:
    def __init__(self, offset, nbytes=100):
        self.offset, self.nbytes = offset, nbytes

    def copy(self):
        return FakeLayer(self.offset, self.nbytes)


def test_prefix_cache_longest_prefix_leaves_a_token_to_feed():
    pc = PrefixCache()
    pc.store([1, 2, 3, 9], [FakeLayer(3)])  # keyed by what the cache holds: [1, 2, 3]
    pc.store([1, 2, 3, 4, 5], [FakeLayer(5)])
    assert pc.lookup([1, 2, 3, 4, 5, 6])[0] == 5
    assert pc.lookup([1, 2, 3, 4, 5])[0] == 3  # the 5-token snapshot would leave nothing to feed
    assert pc.lookup([1, 2, 7])[0] == 0 and pc.lookup([1, 2, 7])[1] is None
    _n, copy = pc.lookup([1, 2, 3, 4, 5, 6])
    copy[0].offset = 99  # the caller's copy is its own
    assert pc.lookup([1, 2, 3, 4, 5, 6])[1][0].offset == 5


def test_prefix_cache_is_bounded_in_entries_and_bytes():
    pc = PrefixCache(max_entries=2, max_bytes=250)
    pc.store([1, 2], [FakeLayer(2)])
    pc.store([3, 4], [FakeLayer(2)])
    pc.lookup([1, 2, 0])  # refreshes [1, 2]
    pc.store([5, 6], [FakeLayer(2)])  # evicts the least recently used: [3, 4]
    assert set(pc.entries) == {(1, 2), (5, 6)}
    pc.store([7, 8], [FakeLayer(2, nbytes=200)])  # 100 + 200 > 250: only the newest stays
    assert set(pc.entries) == {(7, 8)} and pc.nbytes == 200
    pc.store([9, 9], [FakeLayer(2, nbytes=500)])  # alone above the bound: still kept (it is the newest)
    assert set(pc.entries) == {(9, 9)}


def test_prefix_cache_weighed_by_a_given_size_evicts_alike_whatever_the_ranks_hold():
    """Under mlx.launch each rank snapshots only its own layers (different bytes per rank): weighed
    by a size every rank computes alike (the engine's analytic bytes of the key's length), the
    ranks' caches evict the same entries."""
    caches = [PrefixCache(max_entries=8, max_bytes=250, weigh=lambda key, _snap: 40 * len(key)) for _ in range(2)]
    for rank, pc in enumerate(caches):
        held = 100 if rank == 0 else 10  # rank 0 holds ten times the bytes of rank 1
        for key in ([1, 2], [3, 4, 5], [6, 7, 8]):
            pc.store(key + [0], [FakeLayer(len(key), nbytes=held)])
    assert list(caches[0].entries) == list(caches[1].entries) == [(3, 4, 5), (6, 7, 8)]  # 80+120+120 > 250
    by_bytes = [PrefixCache(max_entries=8, max_bytes=250) for _ in range(2)]  # control: their own bytes
    for rank, pc in enumerate(by_bytes):
        for key in ([1, 2], [3, 4, 5], [6, 7, 8]):
            pc.store(key + [0], [FakeLayer(len(key), nbytes=100 if rank == 0 else 10)])
    assert list(by_bytes[0].entries) != list(by_bytes[1].entries)


def test_snapshots_of_the_real_cache_are_not_aliased():
    """A resumed snapshot continues exactly like an uninterrupted cache, however often it is reused."""
    model, tok = tiny()
    ids = tok.encode("Snapshots must be independent copies", add_special_tokens=False)
    pc = PrefixCache()
    cache = model.make_cache()
    model(mx.array(ids[:5])[None], cache)
    pc.store(ids, cache)
    model(mx.array(ids[5:7])[None], cache)  # the live cache moves on; the snapshot must not
    outs = []
    for _ in range(2):
        n, snap = pc.lookup(ids)
        assert n == 5
        outs.append(model(mx.array(ids[5:])[None], snap)[0, -1])
    full = model(mx.array(ids)[None], model.make_cache())[0, -1]
    # same positions, same cached entries: equal up to chunked-vs-whole summation order (observed ~1e-6)
    for o in outs:
        assert mx.abs(o - full).max().item() <= 1e-4 * mx.abs(full).max().item()
