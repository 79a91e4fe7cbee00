"""DeepSeek-V4: embedding -> 4 mHC streams -> blocks (attention, MoE) -> hc_head -> norm -> head.

Parameter names equal the official checkpoint's (embed.weight, layers.3.attn.wq_a.weight, ...),
except that routed experts are stacked per layer (layers.L.ffn.experts.w1.weight [E, inter, d]).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention
from .cache import LayerCache
from .config import ModelArgs
from .mhc import hc_head, hc_post, hc_pre
from .moe import MoE
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, hashed: bool, streamed: bool = False, shard=None):
        super().__init__()
        self.args = args
        self.attn = Attention(args, layer, shard)
        self.ffn = MoE(args, hashed, streamed, shard)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        n = (2 + args.hc_mult) * args.hc_mult
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", mx.zeros((n, args.hc_mult * args.dim), dtype=mx.float32))
            setattr(self, f"hc_{site}_base", mx.zeros((n,), dtype=mx.float32))
            setattr(self, f"hc_{site}_scale", mx.ones((3,), dtype=mx.float32))

    def _hc(self, site: str, X: mx.array, after=None):
        """The sub-layer's input, already through its RMSNorm (fused with mHC pre on Metal), post, comb; after:
        the previous sub-layer's (output, post, comb), whose mHC post comes first (the same launch on Metal). The
        streams the sub-layer reads come fourth (X itself without `after`)."""
        a, norm = self.args, getattr(self, f"{site}_norm")
        out = hc_pre(X, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_scale"),
                     getattr(self, f"hc_{site}_base"), a.hc_sinkhorn_iters, a.hc_eps, a.norm_eps,
                     (norm.weight, norm.eps), after)
        return out if after is not None else (*out, X)

    def __call__(self, X: mx.array, tokens: mx.array, cache: LayerCache, simulate: bool,
                 experts=None) -> mx.array:
        """simulate: the trained activation formats (Model.simulate_qat)."""
        X, (y, post, comb) = self.pending(X, None, tokens, cache, simulate, experts)
        return hc_post(y, X, post, comb)

    def pending(self, X: mx.array, after, tokens: mx.array, cache: LayerCache, simulate: bool, experts=None):
        """The block short of its last mHC post: (its MoE's input streams, (the MoE output, post, comb)), what
        hc_post or the next block's `after` takes. after: the previous block's pending part, X its streams;
        its hc_post comes first (on Metal in this block's first hc_pre launch)."""
        h, post, comb, X = self._hc("attn", X, after)
        h, post, comb, X = self._hc("ffn", X, after=(self.attn(h, cache, simulate), post, comb))
        return X, (self.ffn(h, tokens, experts), post, comb)


class HCHead(nn.Module):
    """Mixin holding the final stream collapse parameters (hc_head_fn / base / scale)."""

    def _init_head(self, args: ModelArgs):
        self.hc_head_fn = mx.zeros((args.hc_mult, args.hc_mult * args.dim), dtype=mx.float32)
        self.hc_head_base = mx.zeros((args.hc_mult,), dtype=mx.float32)
        self.hc_head_scale = mx.ones((1,), dtype=mx.float32)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def collapse(self, X: mx.array) -> mx.array:
        a = self.args
        return self.norm(hc_head(X, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, a.hc_eps, a.norm_eps))


class MTPBlock(Block, HCHead):
    """Multi-token prediction: combines the main model's final streams at position i with the
    embedding of token i+1 to predict token i+2. Shares embed and head with the main model."""

    def __init__(self, args: ModelArgs, layer: int, streamed: bool = False, shard=None):
        super().__init__(args, layer, hashed=False, streamed=streamed, shard=shard)
        self.e_proj = nn.Linear(args.dim, args.dim, bias=False)
        self.h_proj = nn.Linear(args.dim, args.dim, bias=False)
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self._init_head(args)

    def __call__(self, h: mx.array, next_tokens: mx.array, embed: nn.Embedding, cache: LayerCache, simulate: bool,
                 experts=None):
        """The block's output streams [B, L, hc, d] (before its hc_head): drafting recurses on them."""
        e = self.e_proj(self.enorm(embed(next_tokens)))  # [B, L, d]
        X = e[:, :, None, :] + self.h_proj(self.hnorm(h))  # hnorm per stream
        return super().__call__(X, next_tokens, cache, simulate, experts)


def layer_caches(cache: list) -> list[LayerCache]:
    """The LayerCaches behind `cache`: a batch step's per-layer batch.RowCaches hold one per row."""
    return [r for c in cache for r in getattr(c, "rows", (c,))]


class Remote(nn.Module):
    """A layer held by another rank (pipeline mode): no parameters here."""


class Model(HCHead):
    """streamed_experts=True: the routed experts are no parameters; `expert_store` (an
    expert_store.ExpertStore, attached by load) reads them from the checkpoint on demand.
    stage (a distributed.Stage): this rank holds only its pipeline stage's layers, plus the
    embedding on the first rank and hc_head / norm / head / MTP on the last; parameter names stay
    global (layers.7.* is layers.7.* on whichever rank holds it).
    shard (a distributed.TensorShard): this rank holds every layer, each with only its output groups,
    routed experts and shared-expert rows; two all_sums per layer, and every rank computes the logits."""

    def __init__(self, args: ModelArgs, simulate_qat: bool = True, streamed_experts: bool = False, stage=None,
                 shard=None):
        super().__init__()
        self.args = args
        self.simulate_qat = bool(simulate_qat)  # the trained activation formats (formats.py), as the reference
        self.expert_store = None
        self.stage = stage
        self.shard = shard
        self.owned = stage.layers if stage is not None else range(args.n_layers)
        first, last = stage is None or stage.first, stage is None or stage.last
        if first:
            self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [Block(args, i, i < args.n_hash_layers, streamed_experts, shard) if i in self.owned
                       else Remote() for i in range(args.n_layers)]
        n_mtp = args.n_mtp_layers if last else 0
        self.mtp = [MTPBlock(args, args.n_layers + i, streamed_experts, shard) for i in range(n_mtp)]
        if last:
            self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
            self._init_head(args)

    def make_cache(self, compact: bool | None = None) -> list[LayerCache]:
        """One LayerCache per layer this rank holds (all of them in one process). compact
        (default: simulate_qat) stores compressed entries and indexer keys in the trained FP8 /
        FP4 formats: lossless, as the simulation rounds to them."""
        compact = self.simulate_qat if compact is None else compact
        if compact and not self.simulate_qat:
            raise ValueError("a compact cache needs simulate_qat=True (otherwise storage would round values)")
        a = self.args
        return [LayerCache(a.ratio(i), a.window_size, compact, a.nope_head_dim) for i in self.owned]

    @property
    def evaluates_inside(self) -> bool:
        """A forward that evaluates on its way (streamed experts load what the router chose; a split
        model hands its streams on): only the thread that builds it can evaluate it."""
        return self.expert_store is not None or self.stage is not None or self.shard is not None

    def make_mtp_cache(self) -> list[LayerCache]:
        a = self.args
        return [LayerCache(a.ratio(a.n_layers + i), a.window_size) for i in range(len(self.mtp))]

    def hidden_streams(self, tokens: mx.array, cache: list[LayerCache] | None = None) -> mx.array:
        """tokens [B, L] -> final residual streams [B, L, hc, d] (before hc_head); on a pipeline
        rank, the streams after its own layers (fed by the previous rank's)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        if cache is None:
            cache = self.make_cache()
        if len(cache) != len(self.owned):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.owned)}")
        a = self.args
        if self.stage is not None and not self.stage.first:
            X = self.stage.receive((*tokens.shape, a.hc_mult, a.dim))
        else:
            e = self.embed(tokens)
            X = mx.broadcast_to(e[:, :, None, :], (*e.shape[:2], a.hc_mult, e.shape[-1]))
        after = None  # a block's last mHC post, folded into the next block's first launch
        for i, c in zip(self.owned, cache):
            X, after = self.layers[i].pending(X, after, tokens, c, self.simulate_qat, self._experts(f"layers.{i}"))
        return X if after is None else hc_post(after[0], X, *after[1:])

    def _experts(self, block: str):
        """The expert store's view of one block's routed experts (None when they are resident)."""
        return None if self.expert_store is None else self.expert_store.layer(f"{block}.ffn.experts")

    def logits(self, h: mx.array) -> mx.array:
        """Head in float32, as the reference computes it."""
        return self.head(h.astype(mx.float32)).astype(mx.float32)

    def __call__(self, tokens: mx.array, cache: list[LayerCache] | None = None, last_only: bool = False,
                 chunk: int = 2048) -> mx.array:
        """tokens [B, L] -> logits [B, L, vocab] (float32) for every position, or [B, 1, vocab]
        for the last one only. Inputs longer than `chunk` run chunk by chunk through the cache
        (numerically the same), so activation memory stays bounded whatever L is."""
        if cache is None:
            cache = self.make_cache()
        L = tokens.shape[-1]
        out = []
        for s in range(0, L, chunk):
            X = self.hidden_streams(tokens[:, s : s + chunk], cache)
            wanted = not (last_only and s + chunk < L)
            if self.stage is not None:
                if wanted:
                    out.append(self._stage_logits(X, cache, last_only))
                else:
                    self.stage.finish(X, None, None, layer_caches(cache))
                continue
            if not wanted:
                self._eval(X, cache)  # materialise this chunk before the next
                continue
            out.append(self.logits(self.collapse(X[:, -1:] if last_only else X)))
            if self.shard is not None or s + chunk < L:
                self._eval(out[-1], cache)
        return out[0] if len(out) == 1 else mx.concatenate(out, axis=1)

    def _eval(self, y: mx.array, cache: list[LayerCache]):
        """Evaluate y and the caches; in tensor mode under the watchdog, as the all_sums wait on every rank
        (a rank that stops answering then ends the job instead of hanging it)."""
        if self.shard is None:
            mx.eval(y, [c.state for c in cache])
        else:
            with self.shard.watchdog.guard("a tensor-parallel step"):
                mx.eval(y, [c.state for c in cache])

    def _stage_logits(self, X: mx.array, cache: list[LayerCache], last_only: bool) -> mx.array:
        """Pipeline: the last stage computes the logits, every rank receives them (evaluated)."""
        B, L = X.shape[:2]
        shape = (B, 1 if last_only else L, self.args.vocab_size)
        y = self.logits(self.collapse(X[:, -1:] if last_only else X)) if self.stage.last else None
        return self.stage.finish(X, y, shape, layer_caches(cache))

    def mtp_logits(self, h: mx.array, next_tokens: mx.array, cache: list[LayerCache] | None = None) -> mx.array:
        """Draft logits of the MTP block: h [B, L, hc, d] streams at positions i, next_tokens the
        ids at i+1 -> logits [B, L, vocab] predicting token i+2."""
        X = self.mtp_streams(h, next_tokens, cache)
        return self.logits(self.mtp[0].collapse(X))

    def mtp_streams(self, h: mx.array, next_tokens: mx.array, cache: list[LayerCache] | None = None) -> mx.array:
        """The MTP block's output streams [B, L, hc, d] for trunk streams h at positions i and the
        ids at i + 1 (the positions continue the MTP cache's offset)."""
        if not self.mtp:
            raise ValueError("this checkpoint has no MTP layer")
        cache = cache or self.make_mtp_cache()
        return self.mtp[0](h, next_tokens, self.embed, cache[0], self.simulate_qat, self._experts("mtp.0"))
