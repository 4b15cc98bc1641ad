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
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

ScoreFn = Callable[["ScoreInputs"], Tensor]
SCORES: dict[str, ScoreFn] = {}
GQA_MODES = ("sum", "pre")


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
        invalid = ~self.valid[..., None]
        return self.k.float().masked_fill(invalid, 0.0), self.v.float().masked_fill(invalid, 0.0)

    @cached_property
    def _zraw(self) -> Tensor:
        """(B, Hkv, G, W, n) logits for every (query, slot), visible or not (finite: invalid slots are 0)."""
        B, Hq, W, D = self.q.shape
        q = self.q.float().masked_fill(
            (self.q_pos < 0)[:, None, :, None], 0.0
        )  # padding queries: 0, not garbage
        qg = q.reshape(B, -1, self.group, W, D) * (1.0 / math.sqrt(D))
        return qg @ self._kv32[0][:, :, None].transpose(-1, -2)

    @cached_property
    def _zg(self) -> Tensor:
        """(B, Hkv, G, W, n) logits, 0 where not visible."""
        return self._zraw.masked_fill(~self.visible[:, :, None], 0.0)

    @cached_property
    def _Ag(self) -> Tensor:
        """(B, Hkv, G, W, n) softmax over visible keys; all zeros for a query that sees no key.

        One fused softmax of the logits plus a 0 / -inf visibility bias; a query that sees nothing gives
        a row of NaN, which becomes 0.
        """
        bias = torch.zeros(self.visible.shape, device=self.k.device).masked_fill_(
            ~self.visible, float("-inf")
        )
        return torch.softmax(self._zraw + bias[:, :, None], dim=-1).nan_to_num_(0.0)

    @property
    def z(self) -> Tensor:
        """(B, Hq, W, n) float32 logits q.k / sqrt(D), 0 where not visible."""
        return self._zg.flatten(1, 2)

    @property
    def A(self) -> Tensor:
        """(B, Hq, W, n) float32 attention probabilities, 0 where not visible."""
        return self._Ag.flatten(1, 2)

    @cached_property
    def O(self) -> Tensor:  # noqa: E743 (the spec name)
        """(B, Hq, W, Dv) float32 attention outputs (before o_proj) o_i = sum_p A_ip v_p."""
        return (self._Ag @ self._kv32[1][:, :, None]).flatten(1, 2)

    @cached_property
    def vnorm2(self) -> Tensor:
        """(B, Hkv, n) float32 squared value norms ||v_p||^2 (0 for invalid slots)."""
        return self._kv32[1].square().sum(-1)

    @cached_property
    def attention(self) -> Tensor:
        """A in this bundle's ``gqa`` layout: (B, Hkv, G', W, n) (group-averaged for ``"pre"``)."""
        return self._Ag.mean(2, keepdim=True) if self.gqa == "pre" else self._Ag

    @cached_property
    def terms(self) -> Terms:
        """The shared per-(h, i, p) quantities for this bundle's ``gqa`` mode (see :class:`Terms`).

        ``z`` here is unmasked: every score multiplies it by A, which is 0 wherever a key is not visible.
        """
        A = self.attention
        z = self._zraw.mean(2, keepdim=True) if self.gqa == "pre" else self._zraw
        v = self._kv32[1][:, :, None]  # (B, Hkv, 1, n, Dv)
        o = A @ v
        vo = o @ v.transpose(-1, -2)
        return Terms(A, z, vo, o.square().sum(-1, keepdim=True), self.vnorm2[:, :, None, None, :])


def reduce_term(inp: ScoreInputs, term: Tensor) -> Tensor:
    """Sum a per-(head, query, slot) term (B, Hkv, G', W, n) (the layout of `inp.terms`) over the group
    and the observation queries -> (B, Hkv, n) scores, -inf on invalid slots: the last line of a score."""
    return term.sum((2, 3)).masked_fill(~inp.valid, float("-inf"))


_reduce = reduce_term


def _dist2(t: Terms) -> Tensor:
    """||v_p - o_i||^2 by expansion, clamped at 0: (B, Hkv, G', W, n) (a new tensor)."""
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


@register_score("obv")
def obv(inp: ScoreInputs) -> Tensor:
    """OBCache value saliency: sum of A_ip^2 ||v_p||^2. Returns (B, Hkv, n)."""
    t = inp.terms
    return _reduce(inp, t.A.square().mul_(t.v2))


@register_score("obk")
def obk(inp: ScoreInputs) -> Tensor:
    """OBCache key saliency: sum of (A_ip z_ip)^2 ||v_p - o_i||^2. Returns (B, Hkv, n)."""
    t = inp.terms
    return _reduce(inp, (t.A * t.z).square_().mul_(_dist2(t)))


@register_score("obkv")
def obkv(inp: ScoreInputs) -> Tensor:
    """OBCache joint saliency: sum of A_ip^2 ||(1 + z_ip) v_p - z_ip o_i||^2. Returns (B, Hkv, n)."""
    t = inp.terms
    z1 = 1.0 + t.z
    sq = (z1.square() * t.v2 + t.z.square() * t.o2 - 2.0 * t.z * z1 * t.vo).clamp_min(0.0)
    return _reduce(inp, t.A.square() * sq)


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
    return _reduce(inp, ratio * _dist2(t).sqrt())


def score_queries_chunked(
    score_fn: ScoreFn | str,
    q: Tensor,
    q_pos: Tensor,
    k: Tensor,
    v: Tensor,
    k_pos: Tensor,
    gqa: str = "sum",
    chunk: int = 256,
    causal_prefix: bool = False,
) -> Tensor:
    """Sum a score over query chunks, so peak extra memory is O(Hq x chunk x n), never n x n.

    Exact, because every score is a sum over queries (e.g. H2O: all n prefill queries at once).

    Args:
        score_fn: a score function or a registered score name.
        q: (B, Hq, W, D) queries; q_pos: (B, W); k, v: (B, Hkv, n, D); k_pos: (B, Hkv, n).
        gqa: "sum" or "pre".
        chunk: queries per chunk (>= 1).
        causal_prefix: the W queries are the tokens held in the last W slots (a layer that was just
            appended to), so the chunk [s, e) can only see the first n - W + e slots: only those are
            scored, which halves the work of a prefill.

    Returns:
        (B, Hkv, n) float32 scores, -inf on invalid slots.
    """
    fn = get_score(score_fn) if isinstance(score_fn, str) else score_fn
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    k, v = k.float(), v.float()
    n, W = k.shape[2], q.shape[2]
    invalid = k_pos < 0
    total = torch.zeros(k_pos.shape, dtype=torch.float32, device=k.device)
    for s in range(0, W, chunk):
        e = min(W, s + chunk)
        end = n - W + e if causal_prefix else n
        part = fn(
            ScoreInputs(q[:, :, s:e], k[:, :, :end], v[:, :, :end], q_pos[:, s:e], k_pos[:, :, :end], gqa)
        )
        total[..., :end] += part.masked_fill(invalid[..., :end], 0.0)
    return total.masked_fill(invalid, float("-inf"))


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
