"""evaluator.Evaluator: decode steps evaluated on a worker thread while the host builds the next one.
Truths: evaluation on the calling thread (values), MLX's stream ownership (what must be handed to the
worker), thread liveness (the worker's lifetime)."""

import gc
import threading
import types

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsv4 import evaluator, generate, load


def _workers() -> int:
    return sum(t.name == "mlx-dsv4-eval" and t.is_alive() for t in threading.enumerate())


def _chain(x: mx.array, n: int) -> mx.array:
    for _ in range(n):
        x = mx.tanh(x @ x.T * 0.01)
    return x


def _submit_chain(ev: evaluator.Evaluator, size: int, n: int, seed: int) -> tuple[mx.array, mx.array]:
    """(a [size, size], `n` links of _chain from it, submitted to the worker). adopt first, as a decoder
    does: every submission hands over the global key, which earlier tests may have left lazy here."""
    a = mx.random.normal((size, size), key=mx.random.key(seed))
    ev.adopt(a)
    with mx.stream(ev.stream):
        out = _chain(a, n)
    ev.submit(out)
    return a, out


def test_values_equal_evaluation_on_this_thread():
    ev = evaluator.Evaluator()
    a, there = _submit_chain(ev, 64, 20, 1)
    ev.wait()
    assert np.array_equal(np.array(there), np.array(_chain(a, 20)))


def test_the_host_builds_while_the_worker_evaluates():
    """Seconds of matmuls submitted; building a small graph meanwhile returns long before they end."""
    ev = evaluator.Evaluator()
    a, long = _submit_chain(ev, 384, 400, 2)
    with mx.stream(ev.stream):
        short = _chain(a[:8, :8], 50)  # built while the worker is busy: nothing here waits for it
    assert ev._done.empty(), "the worker finished before the host built 50 small ops"
    ev.submit(short)
    ev.wait()
    assert np.array_equal(np.array(short), np.array(_chain(a[:8, :8], 50)))


def test_a_submission_hands_the_random_key_over(monkeypatch):
    """A draw built for the worker splits the global key on the worker's stream: the submission must take
    the key along, or the next draw on this thread fails ("no Stream ... in current thread")."""
    ev = evaluator.Evaluator()
    for hand_over in (True, False):  # False: the negative control
        if not hand_over:
            monkeypatch.setattr(evaluator, "random_state", lambda: [])
        mx.eval(list(mx.random.state))  # what adopt does: the worker may split it now
        with mx.stream(ev.stream):
            x = mx.random.normal((2,))
        ev.submit(x)
        ev.wait()
        if hand_over:
            mx.eval(mx.random.normal((2,)))
        else:
            with pytest.raises(RuntimeError, match="Stream"):
                mx.eval(mx.random.normal((2,)))
    mx.random.seed(0)  # the key is lazy across both streams now: later tests get a fresh one


def test_an_error_reaches_the_waiting_thread_and_the_worker_lives_on():
    ev = evaluator.Evaluator()
    ev.adopt()
    foreign = mx.ones((3,)) + 1  # lazy on this thread's stream: the worker may not evaluate it
    with mx.stream(ev.stream):
        bad = foreign * 2
    ev.submit(bad)
    with pytest.raises(RuntimeError, match="Stream"):
        ev.wait()
    with mx.stream(ev.stream):
        good = mx.arange(4) * 2
    ev.submit(good)
    ev.wait()
    assert good.tolist() == [0, 2, 4, 6]


def _use_and_end_a_thread():
    def use():
        ev = evaluator.for_this_thread()
        ev.adopt()
        with mx.stream(ev.stream):
            x = mx.arange(3) + 1
        ev.submit(x)
        ev.wait()
    t = threading.Thread(target=use)
    t.start()
    t.join()
    gc.collect()


def test_the_worker_ends_with_the_thread_that_used_it(monkeypatch):
    gc.collect()  # earlier tests' Evaluators end their workers when collected
    before = _workers()
    _use_and_end_a_thread()
    for _ in range(100):
        if _workers() == before:
            break
        threading.Event().wait(0.05)
    assert _workers() == before
    # negative control: without the finalizer the worker outlives its thread
    leaked = []
    monkeypatch.setattr(evaluator.weakref, "finalize",
                        lambda obj, *a: leaked.append(obj._todo) or types.SimpleNamespace())
    _use_and_end_a_thread()
    assert _workers() == before + 1
    leaked[0].put(None)  # end it by hand


def test_a_sampled_generation_leaves_the_random_state_usable_here():
    """The sampler splits mx.random's global key on the worker's stream; a later draw on this thread
    would fail ("no Stream ... in current thread") unless the worker evaluated the key too."""
    model, tok = load("tiny-random")
    generate(model, tok, "Once upon a time", max_tokens=5, temperature=0.9, seed=1)
    assert mx.random.normal((2,)).shape == (2,)
    mx.eval(mx.random.normal((2,)))


def test_unseeded_sampling_and_the_global_key(monkeypatch):
    """Without a seed the sampler splits mx.random's global key itself: a key left lazy on this thread
    must be evaluated here before the worker splits it, and the worker must evaluate what it split."""
    model, tok = load("tiny-random")
    for _ in range(2):
        mx.random.normal((1,))  # the key is now lazy on this thread's stream
        generate(model, tok, "Once upon a time", max_tokens=5, temperature=0.9)
        mx.eval(mx.random.normal((2,)))
    # negative control: mx.eval passes over the state object itself (MLX 0.32), so handing over
    # mx.random.state as it is leaves the key lazy on one thread's stream or the other
    monkeypatch.setattr(evaluator, "random_state", lambda: mx.random.state)
    with pytest.raises(RuntimeError, match="Stream"):
        mx.random.normal((1,))
        generate(model, tok, "Once upon a time", max_tokens=5, temperature=0.9)
        mx.eval(mx.random.normal((2,)))
    mx.random.seed(0)  # a usable key for the tests after this one


def test_lazy_weights_and_a_one_token_prompt():
    """Freshly loaded weights are lazy graphs of the loading thread; a one-token prompt has no prefill
    to materialise them before the first step goes to the worker."""
    model, tok = load("tiny-random")
    a = generate(model, tok, [5], max_tokens=6)
    model, tok = load("tiny-random")
    mx.eval(model.parameters())  # materialised on this thread first
    assert generate(model, tok, [5], max_tokens=6) == a
