"""The KV cache: an explicit object, one `LayerCache` per layer, one segment per (batch row, KV head).

Every KV head of every batch row owns a *segment*: a contiguous run of slots in the layer's flat
buffers. A slot holds a key (after RoPE), a value, the token's absolute position, and any per-slot
score accumulators a policy keeps (H2O sums, ...). Segments have their own lengths, so after a
head-adaptive press (AdaKV) heads hold different numbers of tokens and the buffers hold exactly the
kept tokens: no padding to the longest head.

Worked example (1 row, 2 KV heads, 6 prompt tokens, keep 3 tokens in head 0 and 2 in head 1)::

    >>> cache = KVCache.empty(n_layers=1, batch=1, n_kv_heads=2, head_dim=4)
    >>> layer = cache.layers[0]
    >>> pos = cache.next_positions(6)                 # tensor([[0, 1, 2, 3, 4, 5]])
    >>> layer.append(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), pos)
    >>> layer.lengths()
    [[6, 6]]
    >>> layer.keep([torch.tensor([0, 4, 5]), torch.tensor([1, 5])])   # slot indices, per segment
    >>> cache.kept_positions()[0]                     # layer 0: per row, per head
    [[[0, 4, 5], [1, 5]]]
    >>> layer.nbytes() == (3 + 2) * 2 * 4 * 4         # K and V, 5 slots, float32
    True
    >>> cache.next_positions(1)                       # positions continue from 6, not from a length
    tensor([[6]])

Slots are not positions: later tokens get positions from the counter `KVCache.seen`, never from a
segment length, so decoding after eviction uses the same RoPE positions as without eviction.
Slot order inside a segment is the order of arrival (compaction keeps the order it is given, decode
eviction moves the last slot into the freed one); `kept_positions()` sorts for display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def headroom(length: int) -> int:
    """Extra slots reserved when a segment of `length` slots outgrows its capacity while decoding.

    Proportional (1/16, at least 16), so allocated memory stays within ~6% (+16 slots per head) of the
    tokens held, and re-allocations are amortised: one copy per length/16 decoded tokens.
    """
    return max(16, length // 16)


class LayerCache:
    """K/V of one layer, stored as B x Hkv segments of flat (N, D) buffers.

    Attributes:
        k, v: (N, D) flat storage; segment i = b * Hkv + h occupies rows start[i] : start[i] + cap[i],
            of which the first length[i] are in use.
        pos: (N,) long absolute positions; -1 marks an invalid (left-padding) slot.
        acc: per-slot float32 accumulators by name, each (N,), compacted together with k/v/pos.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.batch, self.n_kv_heads, self.head_dim = batch, n_kv_heads, head_dim
        self.k = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.pos = torch.empty(0, dtype=torch.long, device=device)
        self.acc: dict[str, Tensor] = {}
        n = batch * n_kv_heads
        self.start, self.length, self.cap = [0] * n, [0] * n, [0] * n
        self.n_invalid = 0  # number of stored pad slots (pos == -1)

    # ----------------------------------------------------------------------------- inspection
    @property
    def n_segments(self) -> int:
        return self.batch * self.n_kv_heads

    def lengths(self) -> list[list[int]]:
        """Slots in use, as [row][head]."""
        H = self.n_kv_heads
        return [self.length[b * H : (b + 1) * H] for b in range(self.batch)]

    def is_uniform(self) -> bool:
        """True when every segment has the same length and capacity in a (B, Hkv, cap, D) layout."""
        return self._equal_lengths() and self._equal_caps_contiguous()

    def segment(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Views (k (L, D), v (L, D), pos (L,)) of segment i = b * Hkv + h. No copy."""
        s, L = self.start[i], self.length[i]
        return self.k[s : s + L], self.v[s : s + L], self.pos[s : s + L]

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        """(k, v, pos) as (B, Hkv, S, D), (B, Hkv, S, D), (B, Hkv, S) with S the longest segment.

        A view when the layout is uniform; otherwise a padded copy whose padding slots have pos -1.
        """
        B, H, D = self.batch, self.n_kv_heads, self.head_dim
        if self.is_uniform():
            L, c = self.length[0], self.cap[0]
            return (
                self.k.view(B, H, c, D)[:, :, :L],
                self.v.view(B, H, c, D)[:, :, :L],
                self.pos.view(B, H, c)[:, :, :L],
            )
        S = max(self.length)
        k = self.k.new_zeros(B * H, S, D)
        v = self.v.new_zeros(B * H, S, D)
        pos = self.pos.new_full((B * H, S), -1)
        for i in range(self.n_segments):
            ki, vi, pi = self.segment(i)
            k[i, : len(pi)], v[i, : len(pi)], pos[i, : len(pi)] = ki, vi, pi
        return k.view(B, H, S, D), v.view(B, H, S, D), pos.view(B, H, S)

    def nbytes(self) -> int:
        """Bytes allocated for K and V (the buffers' full capacity)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    # ----------------------------------------------------------------------------- storage
    def _reallocate(self, new_cap: Sequence[int]) -> None:
        """Move every segment into fresh buffers with capacities `new_cap` (>= current lengths)."""
        starts, total = [], 0
        for c in new_cap:
            starts.append(total)
            total += c
        src = torch.cat([torch.arange(s, s + L) for s, L in zip(self.start, self.length, strict=True)])
        dst = torch.cat([torch.arange(s, s + L) for s, L in zip(starts, self.length, strict=True)])
        src, dst = src.to(self.k.device), dst.to(self.k.device)

        def move(buf: Tensor, fill: float | int = 0) -> Tensor:
            out = buf.new_full((total, *buf.shape[1:]), fill)
            out[dst] = buf[src]
            return out

        self.k, self.v, self.pos = move(self.k), move(self.v), move(self.pos, -1)
        self.acc = {name: move(a) for name, a in self.acc.items()}
        self.start, self.cap = starts, list(new_cap)

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Append T new tokens to every segment.

        Args:
            k, v: (B, Hkv, T, D) keys (after RoPE) and values.
            pos: (B, T) absolute positions; -1 for left-padding tokens.
        """
        B, H, T, D = k.shape
        if self.k.numel() == 0 and sum(self.length) == 0:  # first fill: allocate exactly, uniform layout
            self.k = k.reshape(B * H * T, D).to(self.k.dtype).clone()
            self.v = v.reshape(B * H * T, D).to(self.v.dtype).clone()
            self.pos = pos[:, None, :].expand(B, H, T).reshape(-1).clone()
            self.start, self.length, self.cap = [i * T for i in range(B * H)], [T] * (B * H), [T] * (B * H)
            self.acc = {name: torch.zeros(B * H * T, device=self.k.device) for name in self.acc}
            self.n_invalid = int((pos < 0).sum()) * H
            return
        if any(L + T > c for L, c in zip(self.length, self.cap, strict=True)):
            self._reallocate(
                [max(c, L + T + headroom(L + T)) for L, c in zip(self.length, self.cap, strict=True)]
            )
        if self.is_uniform():
            L, c = self.length[0], self.cap[0]
            self.k.view(B, H, c, D)[:, :, L : L + T] = k
            self.v.view(B, H, c, D)[:, :, L : L + T] = v
            self.pos.view(B, H, c)[:, :, L : L + T] = pos[:, None, :]
            for a in self.acc.values():
                a.view(B, H, c)[:, :, L : L + T] = 0
        else:
            for i in range(self.n_segments):
                b, h = divmod(i, H)
                s = self.start[i] + self.length[i]
                self.k[s : s + T], self.v[s : s + T], self.pos[s : s + T] = k[b, h], v[b, h], pos[b]
                for a in self.acc.values():
                    a[s : s + T] = 0
        self.length = [L + T for L in self.length]
        self.n_invalid += int((pos < 0).sum()) * H

    def _equal_lengths(self) -> bool:
        return all(x == self.length[0] for x in self.length)

    def _equal_caps_contiguous(self) -> bool:
        c = self.cap[0]
        return all(x == c for x in self.cap) and all(s == i * c for i, s in enumerate(self.start))

    def keep(self, slots: Sequence[Tensor]) -> None:
        """Compact: segment i keeps the slots `slots[i]` (indices into the segment, in the given order).

        Buffers are re-allocated to exactly the kept size, so memory follows the tokens kept.
        """
        if len(slots) != self.n_segments:
            raise ValueError(f"keep() needs {self.n_segments} index tensors, got {len(slots)}")
        idx = [s.to(device=self.k.device, dtype=torch.long) for s in slots]
        for i, ix in enumerate(idx):
            if len(ix) and (int(ix.min()) < 0 or int(ix.max()) >= self.length[i]):
                raise IndexError(f"segment {i}: slot index out of range [0, {self.length[i]})")
        gather = torch.cat([ix + s for ix, s in zip(idx, self.start, strict=True)])
        self.k, self.v, self.pos = self.k[gather], self.v[gather], self.pos[gather]
        self.acc = {name: a[gather] for name, a in self.acc.items()}
        self.length = [len(ix) for ix in idx]
        self.cap = list(self.length)
        self.start = [0] * self.n_segments
        for i in range(1, self.n_segments):
            self.start[i] = self.start[i - 1] + self.length[i - 1]
        self.n_invalid = int((self.pos < 0).sum())

    def remove_slot(self, i: int, slot: int) -> None:
        """Evict one slot of segment i in O(1): its last slot moves into the freed one."""
        s, L = self.start[i], self.length[i]
        last = s + L - 1
        self.n_invalid -= int(self.pos[s + slot] < 0)
        if slot != L - 1:
            for buf in (self.k, self.v, self.pos, *self.acc.values()):
                buf[s + slot] = buf[last]
        self.length[i] = L - 1

    def accumulator(self, name: str) -> Tensor:
        """The per-slot float32 accumulator `name` (N,), created at zero on first use."""
        if name not in self.acc:
            self.acc[name] = torch.zeros(self.pos.shape[0], device=self.k.device)
        return self.acc[name]

    def acc_dense(self, name: str) -> Tensor:
        """Accumulator `name` as (B, Hkv, S), same layout as `dense()` (padding slots 0)."""
        a = self.accumulator(name)
        B, H = self.batch, self.n_kv_heads
        if self.is_uniform():
            return a.view(B, H, self.cap[0])[:, :, : self.length[0]]
        out = a.new_zeros(B * H, max(self.length))
        for i in range(self.n_segments):
            out[i, : self.length[i]] = a[self.start[i] : self.start[i] + self.length[i]]
        return out.view(B, H, -1)

    def add_to_accumulator(self, name: str, values: Tensor) -> None:
        """Add `values` (B, Hkv, S) in `dense()` layout to accumulator `name`."""
        a = self.accumulator(name)
        B, H = self.batch, self.n_kv_heads
        if self.is_uniform():
            a.view(B, H, self.cap[0])[:, :, : self.length[0]] += values
            return
        flat = values.reshape(B * H, -1)
        for i in range(self.n_segments):
            a[self.start[i] : self.start[i] + self.length[i]] += flat[i, : self.length[i]]

    # ----------------------------------------------------------------------------- attention
    def attend(self, q: Tensor, n_new: int) -> Tensor:
        """Attention of new queries over this layer's cache (which already holds the new tokens).

        Each new query sees every slot that was cached before this step, plus the new slots up to and
        including its own (causal); pad slots (pos -1) are seen by no other query.

        Args:
            q: (B, Hq, T, D) queries after RoPE, T = n_new.
        Returns:
            (B, Hq, T, D) attention outputs.
        """
        if self.is_uniform():
            return self._attend_uniform(q, n_new)
        return self._attend_ragged(q, n_new)

    def _attend_uniform(self, q: Tensor, n_new: int) -> Tensor:
        k, v, pos = self.dense()
        L = k.shape[2]
        if self.n_invalid == 0 and n_new == 1:
            return _decode_attention(q, k, v)
        if self.n_invalid == 0 and n_new == L:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        mask = _visibility(pos, L, n_new)  # (B, Hkv, T, L)
        mask = mask.repeat_interleave(q.shape[1] // self.n_kv_heads, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def _attend_ragged(self, q: Tensor, n_new: int) -> Tensor:
        B, Hq, T, D = q.shape
        G = Hq // self.n_kv_heads
        out = torch.empty_like(q)
        for i in range(self.n_segments):
            b, h = divmod(i, self.n_kv_heads)
            k, v, pos = self.segment(i)
            qi = q[b, h * G : (h + 1) * G]  # (G, T, D)
            mask = None
            if n_new > 1 or (pos < 0).any():
                mask = _visibility(pos[None, None], k.shape[0], n_new)[0]  # (1, T, L)
            out[b, h * G : (h + 1) * G] = F.scaled_dot_product_attention(
                qi, k.expand(G, -1, -1), v.expand(G, -1, -1), attn_mask=mask
            )
        return out


def _decode_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One new query per row over every cached slot: two small batched matmuls, softmax in float32.

    (CPU SDPA kernels are tuned for long query blocks; for T = 1 this is several times faster.)
    q: (B, Hq, 1, D); k, v: (B, Hkv, S, D) -> (B, Hq, 1, D).
    """
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, D)  # the G query heads of a KV head as rows
    w = torch.softmax((qg @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(D)), dim=-1)
    return (w.to(v.dtype) @ v).reshape(B, Hq, 1, D)


def _visibility(pos: Tensor, L: int, n_new: int) -> Tensor:
    """Boolean mask (..., T, L): old slots visible if valid, new slots causal, a slot always sees itself."""
    T = n_new
    old = torch.ones(T, L - T, dtype=torch.bool, device=pos.device)
    new = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()
    causal = torch.cat([old, new], dim=1)  # (T, L)
    valid = (pos >= 0)[..., None, :]  # (..., 1, L)
    own = torch.zeros(T, L, dtype=torch.bool, device=pos.device)
    own[torch.arange(T), L - T + torch.arange(T)] = True
    return (causal & valid) | own


class KVCache:
    """One cache per model: a list of `LayerCache` plus the position counter of each batch row.

    Attributes:
        layers: one LayerCache per decoder layer.
        seen: (B,) long, tokens fed so far per row, excluding left padding; the next token's position.
    """

    def __init__(self, layers: list[LayerCache], batch: int, device: torch.device):
        self.layers = layers
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)

    @classmethod
    def empty(
        cls,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        device = torch.device(device)
        layers = [LayerCache(batch, n_kv_heads, head_dim, dtype, device) for _ in range(n_layers)]
        return cls(layers, batch, device)

    @classmethod
    def for_model(cls, cfg, batch: int = 1, dtype=torch.float32, device="cpu") -> KVCache:  # noqa: ANN001
        """An empty cache shaped for a ModelConfig."""
        return cls.empty(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, dtype, device)

    @property
    def batch(self) -> int:
        return self.seen.shape[0]

    def next_positions(self, T: int, n_pad: Tensor | None = None) -> Tensor:
        """Positions (B, T) for the next T tokens and advance the counter.

        Args:
            n_pad: (B,) number of left-padding tokens at the start of these T (prefill only); they get
                position -1 and do not advance the counter.
        """
        ar = torch.arange(T, device=self.seen.device)[None, :]
        if n_pad is None:
            pos = self.seen[:, None] + ar
            self.seen = self.seen + T
            return pos
        n_pad = n_pad.to(self.seen.device)
        pos = self.seen[:, None] + ar - n_pad[:, None]
        pos = torch.where(ar < n_pad[:, None], torch.full_like(pos, -1), pos)
        self.seen = self.seen + T - n_pad
        return pos

    def nbytes(self) -> int:
        """Bytes allocated for K/V over all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def n_tokens(self) -> int:
        """Slots in use over all layers, rows and KV heads."""
        return sum(sum(layer.length) for layer in self.layers)

    def kept_positions(self) -> list[list[list[list[int]]]]:
        """Sorted original positions kept, as [layer][row][head] -> list of positions (pad slots omitted)."""
        out = []
        for layer in self.layers:
            rows = []
            for b in range(layer.batch):
                heads = []
                for h in range(layer.n_kv_heads):
                    _, _, p = layer.segment(b * layer.n_kv_heads + h)
                    heads.append(sorted(int(x) for x in p if x >= 0))
                rows.append(heads)
            out.append(rows)
        return out

    def fork(self) -> KVCache:
        """A deep copy (for trying several presses on one prefill)."""
        new = KVCache.__new__(KVCache)
        new.seen = self.seen.clone()
        new.layers = []
        for layer in self.layers:
            c = LayerCache.__new__(LayerCache)
            c.__dict__.update(layer.__dict__)
            c.k, c.v, c.pos = layer.k.clone(), layer.v.clone(), layer.pos.clone()
            c.acc = {n: a.clone() for n, a in layer.acc.items()}
            c.start, c.length, c.cap = list(layer.start), list(layer.length), list(layer.cap)
            new.layers.append(c)
        return new

    def truncate_to(self, lengths: list[list[int]], seen: Tensor) -> None:
        """Drop slots appended after a snapshot (lengths per layer as `layer.length`, counter `seen`).

        Used to reuse one compressed context for several questions: appended slots are always at the end
        of their segments, so truncation is exact (as long as no decode-time eviction ran in between).
        """
        for layer, ls in zip(self.layers, lengths, strict=True):
            layer.length = list(ls)
            layer.n_invalid = sum(
                int((layer.pos[s : s + n] < 0).sum()) for s, n in zip(layer.start, ls, strict=True)
            )
        self.seen = seen.clone()

    def snapshot(self) -> tuple[list[list[int]], Tensor]:
        """(lengths per layer, counter) to restore with `truncate_to`."""
        return [list(layer.length) for layer in self.layers], self.seen.clone()
