"""Sampling parameters: one type and one set of rules for generation, the CLI and the server's APIs.

Generation owns the rules; the front ends only parse their own spelling (flags, JSON fields) into a
SamplingParams and report a SamplingError in their own format. An API may cap the temperature or the
repetition penalty further (its documented range): `check` takes those caps.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass


class SamplingError(ValueError):
    """A parameter outside its range; `field` names it (a flag or a JSON field to point at)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None

    def check(self, max_temperature: float | None = None,
              max_repetition_penalty: float | None = None) -> SamplingParams:
        """self if every field is in range, else SamplingError naming the first one that is not."""
        t, rp = self.temperature, self.repetition_penalty
        t_hi = "" if max_temperature is None else f" <= {max_temperature:g}"
        rp_hi = "" if max_repetition_penalty is None else f" <= {max_repetition_penalty:g}"
        rules = (
            ("temperature", t, _real(t) and 0 <= t and (max_temperature is None or t <= max_temperature),
             f"0 <= temperature{t_hi}"),
            ("top_p", self.top_p, _real(self.top_p) and 0 < self.top_p <= 1, "0 < top_p <= 1"),
            ("top_k", self.top_k, _int(self.top_k) and 0 <= self.top_k < 2**31, "top_k an integer in [0, 2**31)"),
            ("min_p", self.min_p, _real(self.min_p) and 0 <= self.min_p <= 1, "0 <= min_p <= 1"),
            ("repetition_penalty", rp, rp is None or (_real(rp) and 0 < rp and (max_repetition_penalty is None
                                                                                 or rp <= max_repetition_penalty)),
             f"0 < repetition_penalty{rp_hi}"),
            ("seed", self.seed, self.seed is None or (_int(self.seed) and 0 <= self.seed < 2**64),
             "seed an integer in [0, 2**64)"),
        )
        for name, v, ok, rule in rules:
            if not ok:
                raise SamplingError(name, f"{name} must satisfy {rule}, got {v!r}")
        return self

    def kwargs(self) -> dict:
        """The keyword arguments of stream_generate."""
        return asdict(self)
