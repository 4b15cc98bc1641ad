"""Token saliency scores for KV-cache eviction (spec: docs/scores.md, sections 1, 2 and 5).

Every score is a pure function of a :class:`ScoreInputs` bundle and returns a float32 tensor of shape
(B, Hkv, n): one number per cached slot of each KV head, **higher = keep**. Invalid slots (``k_pos < 0``:
padding, empty or already evicted) get ``-inf``.

Shapes: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv (query head h reads KV head h // G),
W observation queries, n cache slots, D head dim.

Each score is a per-(query head h, observation query i, slot p) term, summed over the observation
queries and over the G query heads of each KV head (``gqa="sum"``, the exact OBD extension), or, with
``gqa="pre"``, computed once per KV head from A and z averaged over the group and O recomputed from the
averaged A. Because every score is a sum over queries, :func:`score_queries_chunked` can sum it over
query chunks without ever building an n x n attention matrix.

Cost: the built-in OBCache scores never build a per-(query, slot) <v_p, o_i> tensor. Their terms are
polynomials in A, z, ||v_p||^2, ||o_i||^2 and <v_p, o_i>, so the sum over queries is taken first, as a
matmul of per-(query, slot) weights against [1, ||o_i||^2, o_i] (:func:`obk`, :func:`obkv`): three
matmuls in all (logits, outputs and that one; obkv adds a two-column one). The expansion's clamp at 0
applies to the sum, which is equal in exact arithmetic.

Adding a score is one function and one decorator line::

    @register_score("my_score")
    def my_score(inp: ScoreInputs) -> Tensor:
        t = inp.terms
        return reduce_term(inp, t.A * t.z)

It becomes the suffix of press names (`snapkv-my_score`, `adakv-h2o-my_score`, ...) for every policy
that takes a score. A name must not contain "-" (the press-name separator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

ScoreFn = Callable[["ScoreInputs"], Tensor]
SCORES: dict[str, ScoreFn] = {}
GQA_MODES = ("sum", "pre")


class Scratch:
    """Float32 buffers that a loop over query chunks reuses from one chunk to the next.

    A fresh multi-megabyte tensor is fresh pages from the OS: the kernel zeroes and maps them at first
    touch, and glibc hands big freed blocks back, so every chunk paid that again (at 2k, ~15,000 page
    faults a layer for H2O's scores, a third of their time on the 2-core machine). `take` returns a view of
    one buffer per name, allocated once at `reserve` entries (or the first request, if larger).
    """

    def __init__(self, reserve: int = 0) -> None:
        self.reserve = reserve
        self._bufs: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        numel = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = self._bufs[name] = torch.empty(max(numel, self.reserve), dtype=torch.float32, device=device)
        return buf[:numel].view(shape)


class Terms(NamedTuple):
    """Per-(head, query, slot) quantities shared by all scores, in group layout.

    G' is G for ``gqa="sum"`` and 1 for ``gqa="pre"`` (group-averaged).
    Attributes:
        A: (B, Hkv, G', W, n) attention probabilities (0 where not visible).
        z: (B, Hkv, G', W, n) logits q.k / sqrt(D) (0 where not visible).
        vo: (B, Hkv, G', W, n) inner products <v_p, o_i>.
        o2: (B, Hkv, G', W, 1) squared output norms ||o_i||^2.
        v2: (B, Hkv, 1, 1, n) squared value norms ||v_p||^2 (0 for invalid slots).
    """

    A: Tensor
    z: Tensor
    vo: Tensor
    o2: Tensor
    v2: Tensor


@dataclass(eq=False)
class ScoreInputs:
    """Everything a saliency score needs for one layer and a set of observation queries.

    Attributes:
        q: (B, Hq, W, D) observation queries, post-RoPE (any float dtype; float32 inside).
        k: (B, Hkv, n, D) cached keys, post-RoPE.
        v: (B, Hkv, n, Dv) cached values.
        q_pos: (B, W) long absolute position of each query; a negative position marks a padding query
            (it sees no key and contributes nothing).
        k_pos: (B, Hkv, n) long absolute position of each slot; -1 (any negative) marks an invalid slot.
        gqa: "sum" (exact OBD over the group) or "pre" (average A and z over the group first).
        outputs: optional (B, Hq, W, Dv) attention outputs of the queries over these slots, when the caller
            has them already (a prefill layer's own float32 attention): used as O instead of A V. Rows
            of queries that see no slot (padding) are ignored; O is 0 there, as when computed.

    Key p is visible to query i when ``0 <= k_pos[p] <= q_pos[i]``. The derived tensors below are computed
    lazily, once, in float32. Contents of invalid slots are ignored (treated as zeros), so empty cache
    memory may hold anything.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    q_pos: Tensor
    k_pos: Tensor
    gqa: str = "sum"
    scratch: Scratch | None = None
    outputs: Tensor | None = None

    def __post_init__(self) -> None:
        q, k, v = self.q, self.k, self.v
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"q, k, v must be 4-D; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        B, Hq, W, D = q.shape
        _, Hkv, n, _ = k.shape
        if k.shape[0] != B or k.shape[3] != D or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if Hkv == 0 or Hq % Hkv:
            raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
        if tuple(self.q_pos.shape) != (B, W) or tuple(self.k_pos.shape) != (B, Hkv, n):
            raise ValueError(
                f"q_pos must be {(B, W)} and k_pos {(B, Hkv, n)}; "
                f"got {tuple(self.q_pos.shape)} and {tuple(self.k_pos.shape)}"
            )
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {GQA_MODES}, got {self.gqa!r}")
        if self.outputs is not None and tuple(self.outputs.shape) != (B, Hq, W, v.shape[3]):
            raise ValueError(f"outputs must be {(B, Hq, W, v.shape[3])}; got {tuple(self.outputs.shape)}")

    @property
    def group(self) -> int:
        """G = Hq // Hkv, the number of query heads sharing one KV head."""
        return self.q.shape[1] // self.k.shape[1]

    @cached_property
    def valid(self) -> Tensor:
        """(B, Hkv, n) bool: slot holds a real token."""
        return self.k_pos >= 0

    @cached_property
    def visible(self) -> Tensor:
        """(B, Hkv, W, n) bool: key p is visible to query i (valid and not in its future)."""
        kp = self.k_pos[:, :, None, :]
        return (kp >= 0) & (kp <= self.q_pos[:, None, :, None])

    @cached_property
    def _kv32(self) -> tuple[Tensor, Tensor]:
        """k, v in float32 with invalid slots zeroed (no copy when every slot is valid and already float32)."""
        k, v = self.k.float(), self.v.float()
        if not bool(self.valid.all()):
            invalid = ~self.valid[..., None]
            k, v = k.masked_fill(invalid, 0.0), v.masked_fill(invalid, 0.0)
        return k, v

    @cached_property
    def _qs(self) -> Tensor:
        """(B, Hkv, G * W, D) float32 queries grouped by KV head, scaled by 1 / sqrt(D); padding queries 0."""
        B, Hq, W, D = self.q.shape
        q = self.q.float().masked_fill((self.q_pos < 0)[:, None, :, None], 0.0)  # padding: 0, not garbage
        return (q * (1.0 / math.sqrt(D))).reshape(B, self.k.shape[1], self.group * W, D)

    @cached_property
    def _zraw(self) -> Tensor:
        """(B, Hkv, G, W, n) logits for every (query, slot), visible or not (finite: invalid slots are 0).

        One (G * W) x n matmul per KV head (a broadcast over the group would copy the keys G times)."""
        B, Hkv, n = self.k_pos.shape
        qs = self._qs
        out = self.buffer("z", (*qs.shape[:3], n))
        return torch.matmul(qs, self._kv32[0].transpose(-1, -2), out=out).view(B, Hkv, self.group, -1, n)

    @cached_property
    def _zg(self) -> Tensor:
        """(B, Hkv, G, W, n) logits, 0 where not visible."""
        return self._zraw.masked_fill(~self.visible[:, :, None], 0.0)

    @cached_property
    def _Ag(self) -> Tensor:
        """(B, Hkv, G, W, n) softmax over visible keys; all zeros for a query that sees no key.

        Only the slots that some query cannot see get a 0 / -inf visibility bias: with slots in position
        order (a prefill, SnapKV's window, an H2O chunk) that is the short causal tail, so the bias is
        added in place to that tail of the logits, which is restored after the softmax; the softmax is
        then one pass over the logits, and no masked copy of them is made. When every query sees every
        slot (a decoding step) there is nothing to mask.
        """
        z, kp, qp = self._zraw, self.k_pos, self.q_pos
        n = z.shape[-1]
        if n == 0 or qp.shape[-1] == 0:
            return torch.softmax(z, dim=-1)
        # slot p is hidden from some query of its row iff it is invalid or after the row's first query
        # (a padding query, position < 0, sees nothing): O(n) from positions, not the (W, n) mask
        blind = torch.nonzero(((kp < 0) | (kp > qp.amin(-1)[:, None, None])).flatten(0, 1).any(0))
        j0 = int(blind[0, 0]) if len(blind) else n
        if j0 == n:  # every query sees every (valid) slot
            return self._softmax(z)
        kt = kp[:, :, None, j0:]  # (B, Hkv, 1, n - j0)
        vis = (kt >= 0) & (kt <= qp[:, None, :, None])  # `visible`, on the tail only
        tail = z[..., j0:]
        saved = tail.clone()
        try:
            tail.add_(torch.where(vis, 0.0, float("-inf"))[:, :, None])
            A = self._softmax(z)
        finally:
            tail.copy_(saved)
        # a query that sees nothing (padding) has a row of NaN
        if not bool(self._sees.all()):
            A.masked_fill_(~self._sees[:, :, None, :, None], 0.0)
        return A

    @cached_property
    def _sees(self) -> Tensor:
        """(B, Hkv, W) bool: query i sees some slot (a valid slot not after it)."""
        kp = self.k_pos
        if kp.shape[-1] == 0:
            return torch.zeros(
                kp.shape[0], kp.shape[1], self.q_pos.shape[1], dtype=torch.bool, device=kp.device
            )
        first = kp.masked_fill(kp < 0, torch.iinfo(kp.dtype).max).amin(-1)  # (B, Hkv) earliest valid slot
        return self.q_pos[:, None, :] >= first[..., None]

    def buffer(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """An uninitialized float32 tensor of `shape` for a temporary called `name`: a view of this bundle's
        `Scratch` (reused from the previous query chunk, so no fresh pages) when it has one, else new.
        A name is one tensor per bundle: take each once."""
        if self.scratch is None:
            return torch.empty(shape, dtype=torch.float32, device=self.k.device)
        return self.scratch.take(name, shape, self.k.device)

    def _softmax(self, z: Tensor) -> Tensor:
        """softmax over the last dim of z into the "A" buffer."""
        return torch.ops.aten._softmax.out(z, -1, False, out=self.buffer("A", tuple(z.shape)))

    @property
    def z(self) -> Tensor:
        """(B, Hq, W, n) float32 logits q.k / sqrt(D), 0 where not visible."""
        return self._zg.flatten(1, 2)

    @property
    def A(self) -> Tensor:
        """(B, Hq, W, n) float32 attention probabilities, 0 where not visible."""
        return self._Ag.flatten(1, 2)

    @cached_property
    def _Og(self) -> Tensor:
        """(B, Hkv, G, W, Dv) float32 attention outputs in group layout (`outputs` when given)."""
        if self.outputs is not None:
            B, Hkv, W = self._sees.shape
            o = self.outputs.float().reshape(B, Hkv, self.group, W, -1)
            if not bool(self._sees.all()):
                o = o.masked_fill(~self._sees[:, :, None, :, None], 0.0)
            return o
        A = self._Ag
        return (A.flatten(2, 3) @ self._kv32[1]).view(*A.shape[:4], -1)

    @property
    def O(self) -> Tensor:  # noqa: E743 (the spec name)
        """(B, Hq, W, Dv) float32 attention outputs (before o_proj) o_i = sum_p A_ip v_p."""
        return self._Og.flatten(1, 2)

    @cached_property
    def vnorm2(self) -> Tensor:
        """(B, Hkv, n) float32 squared value norms ||v_p||^2 (0 for invalid slots)."""
        return self._kv32[1].square().sum(-1)

    @cached_property
    def attention(self) -> Tensor:
        """A in this bundle's ``gqa`` layout: (B, Hkv, G', W, n) (group-averaged for ``"pre"``)."""
        return self._Ag.mean(2, keepdim=True) if self.gqa == "pre" else self._Ag

    @cached_property
    def _layout(self) -> tuple[Tensor, Tensor, Tensor]:
        """(A, z, o) in this bundle's ``gqa`` layout: A and z (B, Hkv, G', W, n), o (B, Hkv, G', W, Dv).

        ``z`` is unmasked (every score multiplies it by A, which is 0 wherever a key is not visible); for
        ``"pre"``, o is recomputed from the group-averaged A."""
        if self.gqa != "pre":
            return self._Ag, self._zraw, self._Og
        A = self.attention
        o = (A.flatten(2, 3) @ self._kv32[1]).view(*A.shape[:4], -1)
        return A, self._zraw.mean(2, keepdim=True), o

    @cached_property
    def terms(self) -> Terms:
        """The shared per-(h, i, p) quantities for this bundle's ``gqa`` mode (see :class:`Terms`).

        ``z`` here is unmasked: every score multiplies it by A, which is 0 wherever a key is not visible.
        The built-in OBCache scores do not use ``vo`` (a (W, n) tensor per head): they reduce over the
        queries first (:func:`_project`).
        """
        A, z, o = self._layout
        vo = (o.flatten(2, 3) @ self._kv32[1].transpose(-1, -2)).view(A.shape)
        return Terms(A, z, vo, o.square().sum(-1, keepdim=True), self.vnorm2[:, :, None, None, :])


def reduce_term(inp: ScoreInputs, term: Tensor) -> Tensor:
    """Sum a per-(head, query, slot) term (B, Hkv, G', W, n) (the layout of `inp.terms`) over the group
    and the observation queries -> (B, Hkv, n) scores, -inf on invalid slots: the last line of a score."""
    return term.sum((2, 3)).masked_fill(~inp.valid, float("-inf"))


_reduce = reduce_term


def dist2(t: Terms) -> Tensor:
    """||v_p - o_i||^2 by expansion, clamped at 0: (B, Hkv, G', W, n) (a new tensor); a building block
    for scores, like `reduce_term`."""
    return torch.add(t.v2 + t.o2, t.vo, alpha=-2.0).clamp_min_(0.0)


def register_score(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding a score function to :data:`SCORES` under ``name``."""

    if not isinstance(name, str) or not name or "-" in name or name in ("full", "none"):
        raise ValueError(f"score name must be a non-empty string without '-', not full/none; got {name!r}")

    def deco(fn: ScoreFn) -> ScoreFn:
        if name in SCORES:
            raise ValueError(f"score {name!r} is already registered")
        SCORES[name] = fn
        return fn

    return deco


def get_score(name: str) -> ScoreFn:
    """Look up a registered score by name; unknown names raise a ValueError listing the valid ones."""
    try:
        return SCORES[name]
    except KeyError:
        raise ValueError(f"unknown score {name!r}; valid scores: {', '.join(sorted(SCORES))}") from None


@register_score("attn")
def attn(inp: ScoreInputs) -> Tensor:
    """Accumulated attention: sum of A_ip (H2O / SnapKV / TOVA term). Returns (B, Hkv, n)."""
    return _reduce(inp, inp.attention)


def _project(w: Tensor, rows: Tensor) -> Tensor:
    """sum over the group and the queries of w[g, i, p] * rows[g, i, :], for every slot p.

    w: (B, Hkv, ..., n) weights; rows: (B, Hkv, ..., C) with the same middle dims (e.g. (G', W)).
    Returns (B, Hkv, C, n): one matmul per KV head, contracting the flattened middle dims, so no
    (query, slot, feature) tensor is ever built.
    """
    return rows.flatten(2, -2).transpose(-1, -2) @ w.flatten(2, -2)


def _dot_v(inp: ScoreInputs, x: Tensor) -> Tensor:
    """<v_p, x[:, :, :, p]> for every slot: x (B, Hkv, Dv, n) -> (B, Hkv, n)."""
    return (x * inp._kv32[1].transpose(-1, -2)).sum(2)


@register_score("obv")
def obv(inp: ScoreInputs) -> Tensor:
    """OBCache value saliency: sum of A_ip^2 ||v_p||^2 = ||v_p||^2 * sum_i A_ip^2. Returns (B, Hkv, n)."""
    A = inp.attention
    return (A * A).sum((2, 3)).mul_(inp.vnorm2).masked_fill_(~inp.valid, float("-inf"))


@register_score("obk")
def obk(inp: ScoreInputs) -> Tensor:
    """OBCache key saliency: sum of (A_ip z_ip)^2 ||v_p - o_i||^2. Returns (B, Hkv, n).

    With w = (A z)^2, factored over the queries (exact in exact arithmetic):
    sum_i w_ip ||v_p - o_i||^2 = ||v_p||^2 sum_i w_ip + sum_i w_ip ||o_i||^2 - 2 <v_p, sum_i w_ip o_i>,
    three reductions in one matmul instead of a (W, n) tensor of <v_p, o_i>. Each term is >= 0, so the
    sum is; the float32 result of the expansion is clamped at 0 (docs/scores.md section 2).
    """
    A, z, o = inp._layout
    w = torch.mul(A, z, out=inp.buffer("obk.w", tuple(A.shape))).square_()
    o2 = o.square().sum(-1, keepdim=True)
    S = _project(w, torch.cat([torch.ones_like(o2), o2, o], -1))  # (B, Hkv, 2 + Dv, n)
    s = torch.addcmul(S[:, :, 1], inp.vnorm2, S[:, :, 0]).sub_(_dot_v(inp, S[:, :, 2:]), alpha=2.0)
    return s.clamp_min_(0.0).masked_fill_(~inp.valid, float("-inf"))


@register_score("obkv")
def obkv(inp: ScoreInputs) -> Tensor:
    """OBCache joint saliency: sum of A_ip^2 ||(1 + z_ip) v_p - z_ip o_i||^2. Returns (B, Hkv, n).

    Expanded, A^2 [(1 + z)^2 ||v||^2 + z^2 ||o||^2 - 2 z (1 + z) <v, o>]. With t = A^2 z^2 and
    y = A^2 z (1 + z), and (1 + z)^2 = 1 + 2 z (1 + z) - z^2, the sum over queries is
    ||v_p||^2 sum_i (A^2 + 2 y - t) + sum_i t ||o_i||^2 - 2 <v_p, sum_i y o_i> (exact in exact
    arithmetic): one matmul against the outputs (weights y) and one against two columns (weights t).
    The float32 result is clamped at 0 (each term is >= 0).
    """
    A, z, o = inp._layout
    u = A * A
    coef = u.sum((2, 3))  # sum_i A^2
    u.mul_(z)  # A^2 z
    t = u * z  # A^2 z^2
    y = u.add_(t)  # A^2 z (1 + z)
    o2 = o.square().sum(-1, keepdim=True)
    ones = torch.ones_like(o2)
    Sy = _project(y, torch.cat([ones, o], -1))  # (B, Hkv, 1 + Dv, n)
    St = _project(t, torch.cat([ones, o2], -1))  # (B, Hkv, 2, n)
    coef.add_(Sy[:, :, 0], alpha=2.0).sub_(St[:, :, 0])
    s = torch.addcmul(St[:, :, 1], inp.vnorm2, coef).sub_(_dot_v(inp, Sy[:, :, 1:]), alpha=2.0)
    return s.clamp_min_(0.0).masked_fill_(~inp.valid, float("-inf"))


@register_score("caote")
def caote(inp: ScoreInputs) -> Tensor:
    """CAOTE: sum of A_ip / (1 - A_ip) * ||o_i - v_p|| (its square is the exact removal error).

    Guard: where A_ip == 1 in float32 (the query attends to nothing else) removal is undefined and the
    term is 0. Close to A = 1 the float32 expansion of ||o - v|| is imprecise; this is an ablation score.
    Returns (B, Hkv, n).
    """
    t = inp.terms
    one_minus = 1.0 - t.A
    ratio = torch.where(one_minus > 0, t.A / one_minus.clamp_min(torch.finfo(t.A.dtype).tiny), 0.0)
    return _reduce(inp, ratio * dist2(t).sqrt())


CHUNK_ELEMENTS = 1 << 21
"""Automatic chunks (`score_queries_chunked` with chunk=None) take as many queries as keep a chunk's
(query head, query, slot) tensors within this many entries (8 MiB in float32): 113 queries for SmolLM2's
9 query heads at n = 2048, 56 at n = 4096. On 2 CPU cores this is as fast as the best fixed chunk at each
length (bigger temporaries are mapped and zeroed afresh at every chunk, smaller ones lose matmul speed);
a fixed chunk of 256 was 1.5x slower at n = 2048 and more at 4096."""


def _chunk_end(s: int, W: int, n: int, Hq: int, chunk: int | None) -> int:
    """The end of the query chunk that starts at s (see `score_queries_chunked`)."""
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // max(Hq * n, 1))
    return min(W, s + chunk)


def score_queries_chunked(
    score_fn: ScoreFn | str | Sequence[ScoreFn | str],
    q: Tensor,
    q_pos: Tensor,
    k: Tensor,
    v: Tensor,
    k_pos: Tensor,
    gqa: str = "sum",
    chunk: int | None = None,
    causal_prefix: bool = False,
    outputs: Tensor | None = None,
) -> Tensor:
    """Sum a score over query chunks, so peak extra memory is O(Hq x chunk x n), never n x n.

    Exact, because every score is a sum over queries (e.g. H2O: all n prefill queries at once).

    Args:
        score_fn: a score function or a registered score name; or a list or tuple of them, all summed
            from the same chunks (each chunk's logits, attention and outputs are computed once and shared:
            the same numbers as one call per score, bit for bit), and a tuple of totals is returned.
        q: (B, Hq, W, D) queries; q_pos: (B, W); k, v: (B, Hkv, n, D); k_pos: (B, Hkv, n).
        gqa: "sum" or "pre".
        chunk: queries per chunk (>= 1); None (default): as many as keep Hq x chunk x n within
            `CHUNK_ELEMENTS`.
        causal_prefix: the W queries are the tokens held in the last W slots (a layer that was just
            appended to), so the chunk [s, e) can only see the first n - W + e slots: only those are
            scored, which halves the work of a prefill.
        outputs: optional (B, Hq, W, D) tensor, filled with the attention outputs o_i = sum_p A_ip v_p of
            the W queries (0 for a query that sees no slot), computed from the same chunks' A: a layer
            whose policy scores every query (H2O) gets its attention from here instead of a second pass.

    Returns:
        (B, Hkv, n) float32 scores, -inf on invalid slots.
    """
    many = isinstance(score_fn, list | tuple)
    fns = [get_score(f) if isinstance(f, str) else f for f in (score_fn if many else [score_fn])]
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    k, v = k.float(), v.float()
    n, W = k.shape[2], q.shape[2]
    invalid = k_pos < 0
    totals = [torch.zeros(k_pos.shape, dtype=torch.float32, device=k.device) for _ in fns]
    B, Hq = q.shape[:2]
    scratch = Scratch(B * Hq * (_chunk_end(0, W, n, Hq, chunk)) * n)  # the biggest chunk's (Hq, W, n)
    s = 0
    while s < W:
        e = _chunk_end(s, W, n, Hq, chunk)
        end = n - W + e if causal_prefix else n
        inp = ScoreInputs(
            q[:, :, s:e], k[:, :, :end], v[:, :, :end], q_pos[:, s:e], k_pos[:, :, :end], gqa, scratch
        )
        for fn, total in zip(fns, totals, strict=True):
            total[..., :end] += fn(inp).masked_fill(invalid[..., :end], 0.0)
        if outputs is not None:  # the score's own A and outputs when it used them (cached), else computed
            outputs[:, :, s:e] = inp.O
        s = e
    out = tuple(total.masked_fill(invalid, float("-inf")) for total in totals)
    return out if many else out[0]


def pool_scores(scores: Tensor, kernel: int, kind: str = "avg") -> Tensor:
    """Smooth scores over slots (SnapKV step 5): stride 1, padding kernel // 2, output length n.

    ``avg`` is ``avg_pool1d`` with the zero padding counted in the mean (kvpress, kernel 5); ``max`` is
    max-pooling (the OBCache paper, kernel 7). Non-finite slots (-inf invalid, +inf protected) count as
    0 (avg) or are ignored (max) inside a neighbour's window and keep their own value; pool before
    marking protected tokens.

    Args:
        scores: (..., n) float scores.
        kernel: odd window size >= 1.
        kind: "avg" or "max".

    Returns:
        (..., n) float32 pooled scores.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd and >= 1, got {kernel}")
    if kind not in ("avg", "max"):
        raise ValueError(f"pooling kind must be 'avg' or 'max', got {kind!r}")
    s = scores.float()
    finite = torch.isfinite(s)
    x = s.masked_fill(~finite, 0.0 if kind == "avg" else float("-inf")).reshape(-1, 1, s.shape[-1])
    if kind == "avg":
        y = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    else:
        y = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    return torch.where(finite, y.reshape(s.shape), s)
