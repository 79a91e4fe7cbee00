"""The per-layer cache: prompt-cache files round-trip, nbytes counts real storage, no module state."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from tinymodels import mlx_model, rel_err, tokens


def test_prompt_cache_file_round_trip(tmp_path):
    m = mlx_model("flash")
    toks = tokens(200, seed=7)
    cache = m.make_cache()
    mx.eval(m(mx.array(toks[:, :150]), cache))
    path = str(tmp_path / "p.safetensors")
    save_prompt_cache(path, cache, {"tokens": "150"})
    loaded = load_prompt_cache(path)
    assert [c.offset for c in loaded] == [150] * len(cache)
    a = np.array(m(mx.array(toks[:, 150:]), cache))
    b = np.array(m(mx.array(toks[:, 150:]), loaded))
    assert rel_err(b, a) == 0.0


def test_nbytes_matches_analytic_size():
    m = mlx_model("flash")
    a = m.args
    T = 300
    cache = m.make_cache()
    mx.eval(m(mx.array(tokens(T)), cache))
    f32 = 4
    for i, c in enumerate(cache):
        r = a.ratio(i)
        expect = min(T, a.window_size) * a.head_dim * f32
        if r:
            expect += (T // r) * a.head_dim * f32  # compressed entries
            coff = 2 if r == 4 else 1
            expect += 2 * (T % r) * coff * a.head_dim * f32  # leftover rows (a, g)
        if r == 4:
            expect += (T // r) * a.index_head_dim * f32 + 2 * (T % r) * 2 * a.index_head_dim * f32
            expect += 2 * r * (a.head_dim + a.index_head_dim) * f32  # previous-window halves
        assert c.compressed is None or c.compressed.shape[1] == (T // r if r else 0)
        assert c.nbytes == expect, (i, r, c.nbytes, expect)


def test_modules_hold_no_state():
    """Running the model must not change any module attribute (state lives in caches only)."""
    m = mlx_model("flash")
    before = {k: np.array(v) for k, v in tree_flatten(m.parameters())}
    attrs = {id(mod): dict(vars(mod)) for _, mod in m.named_modules()}
    mx.eval(m(mx.array(tokens(140)), m.make_cache()))
    after = dict(tree_flatten(m.parameters()))
    assert all(np.array_equal(before[k], np.array(after[k])) for k in before)
    for _, mod in m.named_modules():
        assert {k: id(v) for k, v in vars(mod).items()} == {k: id(v) for k, v in attrs[id(mod)].items()}


def test_two_sequences_with_fresh_caches_are_independent():
    m = mlx_model("flash")
    t1, t2 = tokens(90, seed=11), tokens(90, seed=12)
    ref = np.array(m(mx.array(t2), m.make_cache()))
    mx.eval(m(mx.array(t1), m.make_cache()))
    assert rel_err(np.array(m(mx.array(t2), m.make_cache())), ref) == 0.0
