"""Evaluation on a thread of its own, so that the host builds decode step n + 1 while step n computes.

mlx-lm overlaps the two with mx.async_eval, which on a GPU returns as soon as the work is queued. On
MLX's CPU backend it returns only when all but ~100 nodes of the graph have run (the scheduler keeps
at most 10 tasks of 10 dispatches in flight), so the Python time spent building a step (~25 ms on the
Flash schedule) still adds to every token. Here a worker thread owns a stream and evaluates what is
submitted; mx.eval lets go of the GIL while it waits, so the submitting thread builds meanwhile.

MLX streams belong to the thread that made them: a graph for the worker is built under
`with mx.stream(ev.stream)`, and everything built there must be evaluated by the worker (evaluated
arrays can be read, and used as inputs, from any thread). Global lazy state built there goes in
too: the random key that a sampler splits, which every submission hands over (`random_state()`). So a
decoder calls `adopt` before its first submission: the key may be lazy on the caller's stream.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref

import mlx.core as mx


class Evaluator:
    def __init__(self):
        self._todo, self._done = queue.SimpleQueue(), queue.SimpleQueue()
        self._pending = 0
        worker = threading.Thread(target=_work, args=(self._todo, self._done), name="mlx-dsv4-eval", daemon=True)
        worker.start()
        self.stream = self._done.get()
        # The worker ends with its Evaluator (here: with the thread that used it), but not at exit: a
        # joined Python thread may still be running its C++ thread-local destructors when the main
        # thread tears MLX down, which aborted the process ("terminate called without an active
        # exception", once in a CI run). A daemon worker left waiting on its queue is simply dropped.
        weakref.finalize(self, _stop, self._todo, worker).atexit = False

    def submit(self, *arrays) -> None:
        """Evaluate `arrays` (built on self.stream) after what was submitted before; returns at once. The
        global random key goes too: a sampler built there may have split it on the worker's stream."""
        self._todo.put((arrays, random_state()))
        self._pending += 1

    def adopt(self, *arrays) -> None:
        """Make `arrays` (lazy on this thread's stream: weights, caches, history) usable by the worker by
        evaluating them here, with the global random key, once the worker is idle: work in flight (another
        stream decoding on this thread) may have split the key on the worker's stream, and only the worker
        may evaluate that; once it has, this thread may read it."""
        self.wait()
        mx.eval(*arrays, random_state())

    def wait(self, keep: int = 0) -> None:
        """Until at most `keep` of the latest submissions are unfinished; raises the first error."""
        error = None
        while self._pending > keep:
            e = self._done.get()
            self._pending -= 1
            error = error or e
        if error is not None:
            raise error


def _work(todo: queue.SimpleQueue, done: queue.SimpleQueue) -> None:
    done.put(mx.new_stream(mx.cpu))
    while (arrays := todo.get()) is not None:
        try:
            mx.eval(arrays)
            done.put(None)
        except Exception as e:  # handed to the thread that waits: the worker lives on
            done.put(e)


def _stop(todo: queue.SimpleQueue, worker: threading.Thread) -> None:
    todo.put(None)
    if worker is not threading.current_thread():
        worker.join(timeout=60)


def random_state() -> list[mx.array]:
    """The global random key as mx.eval and Evaluator.submit take it: mx.random.state is not a list
    (MLX 0.32: a _RandomState), and mx.eval passes over it silently, leaving the key lazy."""
    return list(mx.random.state)


_local = threading.local()
_enabled = os.environ.get("MLX_DSV4_EVAL_THREAD", "1") != "0"


def set_enabled(on: bool) -> None:
    """Off (or MLX_DSV4_EVAL_THREAD=0): pipelined decoding uses mx.async_eval on the CPU too."""
    global _enabled
    _enabled = bool(on)


def for_this_thread() -> Evaluator | None:
    """This thread's Evaluator on the CPU; None on a GPU, where mx.async_eval already overlaps."""
    if not _enabled or mx.default_device() != mx.cpu:
        return None
    if not hasattr(_local, "evaluator"):
        _local.evaluator = Evaluator()
    return _local.evaluator
