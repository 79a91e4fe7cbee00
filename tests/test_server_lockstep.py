"""The engine's lockstep within one process: a follower engine fed the leader's messages (new jobs,
cancellations, shutdown, one per loop iteration) makes exactly the leader's model calls, with a
greedy, an unseeded sampled and a mid-stream cancelled request in one batch. Negative controls: a
follower fed a different prompt token, deaf to a cancellation, or missing rank 0's seed does not.
(tests/test_distributed_serve.py runs the same over MLX collectives between two processes.)"""

import copy
import threading

import pytest

from mlx_dsv4.server.engine import DONE, Engine
from server_util import RecordingModel, prompt_ids, tiny


class Tape:
    """Stands in for lockstep.Lockstep: the leader records each message it shares (None included),
    a follower replays a recorded tape."""

    def __init__(self, leader: bool, tape: list | None = None):
        self.leader, self.tape = leader, [] if tape is None else list(tape)

    def share(self, message):
        if self.leader:
            self.tape.append(message)
            return message
        return self.tape.pop(0) if self.tape else None  # a diverged follower runs on past the tape


@pytest.fixture(scope="module")
def recorded():
    model, tok = tiny()
    rec, tape = RecordingModel(model), Tape(True)
    engine = Engine(rec, tok, lockstep=tape, max_batch=4)
    seen = {k: [] for k in "abc"}
    done = {k: threading.Event() for k in "abc"}
    jobs = {}

    def emit(k):
        def on(item):
            if item is DONE:
                done[k].set()
            elif not isinstance(item, BaseException):
                seen[k].append(item.token)
                if k == "a" and len(seen["a"]) == 3:
                    jobs["c"].cancel()  # a client leaves while its row runs (the HTTP thread's view)
        return on

    hi = prompt_ids([{"role": "user", "content": "Hello"}])
    jobs["c"] = engine.submit(prompt_ids([{"role": "user", "content": "Tell me more"}]),
                              {"max_tokens": 60, "temperature": 0.0}, emit("c"))
    jobs["a"] = engine.submit(hi, {"max_tokens": 12, "temperature": 0.0}, emit("a"))
    jobs["b"] = engine.submit(hi, {"max_tokens": 10, "temperature": 1.0}, emit("b"))  # no seed: rank 0 picks one
    for e in done.values():
        assert e.wait(120)
    engine.close()
    assert not engine.thread.is_alive()
    assert jobs["c"].finish_reason == "cancelled" and len(seen["c"]) < 60
    return rec.calls, tape.tape


def replay(tape: list) -> list:
    model, tok = tiny()
    rec = RecordingModel(model)
    engine = Engine(rec, tok, lockstep=Tape(False, tape), max_batch=4)
    engine.thread.join(120)
    assert not engine.thread.is_alive()
    return rec.calls


def calls(record):
    return [toks for toks, _thread in record]


def test_a_follower_fed_the_messages_makes_the_leaders_model_calls(recorded):
    leader, tape = recorded
    assert any(m and m["cancel"] for m in tape) and tape[-1]["close"]
    b = [m for m in tape if m and m["jobs"]]
    assert any(p["temperature"] == 1.0 and isinstance(p["seed"], int) for m in b for _, p in m["jobs"])
    assert calls(replay(tape)) == calls(leader)


def _edit(tape, fn):
    tape = copy.deepcopy(tape)
    for m in tape:
        if m:
            fn(m)
    return tape


def test_negative_controls_a_follower_fed_otherwise_diverges(recorded):
    leader, tape = recorded

    def other_token(m):
        for toks, _ in m["jobs"][:1]:
            toks[-2] = (toks[-2] + 1) % 1000

    def deaf(m):
        m["cancel"] = []

    def unseeded(m):
        for _, p in m["jobs"]:
            if p["temperature"] > 0:
                p["seed"] = None

    for fn in (other_token, deaf, unseeded):
        assert calls(replay(_edit(tape, fn))) != calls(leader), fn.__name__
