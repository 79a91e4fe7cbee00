"""Counting a decode loop's synchronisations: evaluations on the decoding (main) thread, asynchronous
evaluations, submissions to the evaluator thread and read-backs (`item`)."""

import collections
import threading

import mlx.core as mx

from mlx_dsv4 import evaluator


def count_syncs(monkeypatch) -> collections.Counter:
    """A Counter that the patched calls fill from now on (the worker's own mx.eval is not counted)."""
    calls = collections.Counter()

    def counted(name, f, here_only=False):
        def g(*a, **k):
            if not here_only or threading.current_thread() is threading.main_thread():
                calls[name] += 1
            return f(*a, **k)
        return g

    monkeypatch.setattr(mx, "eval", counted("eval", mx.eval, here_only=True))
    monkeypatch.setattr(mx, "async_eval", counted("async_eval", mx.async_eval))
    monkeypatch.setattr(evaluator.Evaluator, "submit", counted("submit", evaluator.Evaluator.submit))
    monkeypatch.setattr(mx.array, "item", counted("item", mx.array.item))
    return calls
