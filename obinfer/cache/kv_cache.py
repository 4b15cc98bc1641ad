"""The KV cache: an explicit object, one `LayerCache` per layer, one segment per (batch row, KV head).

This module is storage only: where keys, values and positions live, how they are appended, evicted,
copied and rolled back. Attention over a layer's cache is in `obinfer/cache/attention.py`, which reads
the storage through the small read API listed on `LayerCache`.

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

Snapshots are versioned. `KVCache.snapshot()` remembers the lengths; `KVCache.truncate_to()` drops
what was appended since. That is exact only if nothing was *removed* in between, so every removal
(`LayerCache.keep`, `LayerCache.remove_slot`) gives the layer a new version, and truncating to an older
one is refused::

    >>> snap = cache.snapshot()
    >>> pos = cache.next_positions(2)
    >>> layer.append(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), pos)
    >>> cache.truncate_to(snap)                       # appends only: exact
    >>> layer.lengths()
    [[3, 2]]
    >>> layer.remove_slot(0, 1)                       # an eviction (slot 1 of head 0: position 4)
    >>> cache.truncate_to(snap)
    Traceback (most recent call last):
    ...
    obinfer.cache.kv_cache.CacheError: cannot truncate layer 0 to this snapshot: slots were evicted since it was taken (keep / remove_slot), the cache was truncated to an earlier snapshot in between, or the snapshot is of another cache
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from obinfer.errors import ObinferError

# Process-wide, so that a version is never shared by two caches (a fork and its parent included)
# unless one was copied from the other.
_versions = itertools.count(1)


class CacheError(ObinferError):
    """A cache operation that would leave the cache inconsistent (e.g. truncating across an eviction)."""


def host_tensor(values: Sequence, device: torch.device) -> Tensor:
    """A small long tensor from host ints on `device`, copied without waiting for the device (an
    accelerator gets it from pinned memory, non-blocking; a blocking copy would wait for queued work)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


CAP_ALIGN = 64  # bfloat16 / float16 on CPU: a grown segment's capacity is a multiple of this many slots


def headroom(length: int, align: int = 1) -> int:
    """Extra slots reserved when a segment of `length` slots outgrows its capacity while decoding.

    Proportional (1/16, at least 16), so allocated memory stays within ~6% (+16 slots per head) of the
    tokens held, and re-allocations are amortised: one copy per length/16 decoded tokens. With `align`,
    length + headroom is rounded up to a multiple of it (+align - 1 slots at most): LayerCache uses
    `CAP_ALIGN` for bfloat16 / float16 on CPU, whose decode attention's matmul shapes follow the
    capacities (`obinfer/cache/attention.py:_stable_shapes`), so that they take few distinct values.
    """
    grown = length + max(16, length // 16)
    return -(-grown // align) * align - length


def _check_rows(rows: Sequence[int], batch: int) -> list[int]:
    """`rows` as a list of distinct batch rows in [0, batch), or ValueError naming the problem."""
    rows = [int(b) for b in rows]
    if not rows:
        raise ValueError("keep_rows needs at least one row")
    if len(set(rows)) != len(rows) or not all(0 <= b < batch for b in rows):
        raise ValueError(f"keep_rows: rows {rows} must be distinct and in [0, {batch})")
    return rows


class LayerCache:
    """K/V of one layer, stored as B x Hkv segments of flat (N, D) buffers.

    Attributes:
        k, v: (N, D) flat storage; segment i = b * Hkv + h occupies rows start[i] : start[i] + cap[i],
            of which the first length[i] are in use.
        pos: (N,) long absolute positions; -1 marks an invalid (left-padding) slot.
        acc: per-slot float32 accumulators by name, each (N,), compacted together with k/v/pos.
        version: a new number whenever slots are removed (`keep`, `remove_slot`) or a snapshot is
            taken (`checkpoint`); `truncate_to` returns to the snapshot's. See `KVCache.snapshot`.

    Read API (what `obinfer/cache/attention.py`, the policies and the presses use; none of it copies
    unless said so):
        n_segments, n_kv_heads, batch, head_dim;
        lengths() / length[i]: slots in use per segment;
        is_uniform(): every segment has the same length, laid out as (B, Hkv, cap, D);
        segment(i): views (k, v, pos) of segment i = b * Hkv + h;
        dense(): (k, v, pos) as (B, Hkv, S, D) -- a view when uniform, a padded copy otherwise;
        n_invalid: pad slots (pos -1) in use; known_no_pads(): n_invalid is known to be 0 (no count);
        segment_tensors(): (start, length) of every segment as (n_segments,) long tensors on the device;
        acc_dense(name): accumulator `name` in the layout of dense().

    What is derived from the storage is kept up to date by the mutations themselves, without reading
    the device: `n_invalid` (counted on the new positions only, or passed by the caller; unknown, and
    recounted on the next read, only after removing slots from a layer that holds pad slots), the
    layout flag of `is_uniform()` and the segment tensors (rebuilt from the host lists when next
    needed, without waiting for the device). Removals (keep, remove_slot, remove_slots) and
    truncations move the version through `_changed`.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.batch, self.n_kv_heads, self.head_dim = batch, n_kv_heads, head_dim
        self.k = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.pos = torch.empty(0, dtype=torch.long, device=device)
        self.acc: dict[str, Tensor] = {}
        n = batch * n_kv_heads
        self.start, self.length, self.cap = [0] * n, [0] * n, [0] * n
        self._n_invalid: int | None = 0  # count of pad slots in use; None = recount from pos on next read
        self._uniform: bool | None = True  # cached is_uniform(); None = recompute from the lists
        # start and length as device tensors (None: rebuilt from the lists on next use). Never modified
        # in place, so copies may share them.
        self._start_t: Tensor | None = None
        self._len_t: Tensor | None = None
        # Versions whose contents the current contents extend by appends only, oldest first; the last
        # one is the current version. A snapshot of version v can be restored iff v is in this list.
        self._history: list[int] = [next(_versions)]

    # ----------------------------------------------------------------------------- read API
    @property
    def n_segments(self) -> int:
        return self.batch * self.n_kv_heads

    @property
    def version(self) -> int:
        return self._history[-1]

    @property
    def n_invalid(self) -> int:
        """Pad slots (pos -1) among the slots in use.

        Kept up to date by the mutations; counted from `pos` (a device read) only when unknown, i.e.
        after slots were removed from a layer that held pad slots.
        """
        if self._n_invalid is None:
            self._n_invalid = int((self._to_dense(self.pos, 0) < 0).sum())  # dense padding 0: not counted
        return self._n_invalid

    def known_no_pads(self) -> bool:
        """True when the layer is known to hold no pad slot (never reads the device)."""
        return self._n_invalid == 0

    def segment_tensors(self) -> tuple[Tensor, Tensor]:
        """(start, length): (n_segments,) long tensors on the device, segment i = b * Hkv + h.

        Read-only (shared with copies of the layer). Built from the host lists when first needed after
        a change (a small copy that does not wait for the device), kept until the next one.
        """
        if self._start_t is None:
            self._start_t = host_tensor(self.start, self.k.device)
        if self._len_t is None:
            self._len_t = host_tensor(self.length, self.k.device)
        return self._start_t, self._len_t

    def lengths(self) -> list[list[int]]:
        """Slots in use, as [row][head]."""
        H = self.n_kv_heads
        return [self.length[b * H : (b + 1) * H] for b in range(self.batch)]

    def is_uniform(self) -> bool:
        """True when every segment has the same length and capacity in a (B, Hkv, cap, D) layout."""
        if self._uniform is None:
            L, c = self.length[0], self.cap[0]
            self._uniform = (
                all(x == L for x in self.length)
                and all(x == c for x in self.cap)
                and all(s == i * c for i, s in enumerate(self.start))
            )
        return self._uniform

    def segment(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Views (k (L, D), v (L, D), pos (L,)) of segment i = b * Hkv + h. No copy."""
        s, L = self.start[i], self.length[i]
        return self.k[s : s + L], self.v[s : s + L], self.pos[s : s + L]

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        """(k, v, pos) as (B, Hkv, S, D), (B, Hkv, S, D), (B, Hkv, S) with S the longest segment.

        A view when the layout is uniform; otherwise a padded copy whose padding slots have pos -1.
        """
        return self._to_dense(self.k, 0), self._to_dense(self.v, 0), self._to_dense(self.pos, -1)

    def acc_dense(self, name: str) -> Tensor:
        """Accumulator `name` as (B, Hkv, S), same layout as `dense()` (padding slots 0)."""
        return self._to_dense(self.accumulator(name), 0)

    def nbytes(self) -> int:
        """Bytes allocated for K and V (the buffers' full capacity)."""
        return self.k.shape[0] * self.slot_bytes

    @property
    def slot_bytes(self) -> int:
        """K and V bytes of one slot (one token of one KV head)."""
        return self.k.shape[1] * self.k.element_size() + self.v.shape[1] * self.v.element_size()

    # ----------------------------------------------------------------------------- layout helpers
    # The only places that tell the uniform layout from the ragged one. The ragged versions are one
    # gather / scatter over index tensors built on the device (no loop over segments, no device read).
    def _dense_index(self) -> tuple[Tensor, Tensor]:
        """(idx, valid), both (n_segments, S) with S the longest segment: idx[i, j] is the flat slot of
        slot j of segment i where valid[i, j] (j < length[i]), and 0 (any slot) elsewhere."""
        start, length = self.segment_tensors()
        ar = torch.arange(max(self.length), device=start.device)
        valid = ar < length[:, None]
        return torch.where(valid, start[:, None] + ar, 0), valid

    def _to_dense(self, buf: Tensor, fill: float | int) -> Tensor:
        """A flat buffer (N, *rest) as (B, Hkv, S, *rest): a view when uniform, else a copy padded with fill."""
        B, H, rest = self.batch, self.n_kv_heads, buf.shape[1:]
        if self.is_uniform():
            return buf.view(B, H, self.cap[0], *rest)[:, :, : self.length[0]]
        idx, valid = self._dense_index()
        out = buf[idx]  # (n_segments, S, *rest)
        out = torch.where(
            valid.view(*valid.shape, *([1] * len(rest))), out, torch.tensor(fill, dtype=buf.dtype)
        )
        return out.view(B, H, -1, *rest)

    def _write_new(self, buf: Tensor, values: Tensor, dst: Tensor | None) -> None:
        """Segment i gets values[b, h] (T slots) right after its last slot in use (capacity is there).

        values: (B, Hkv, T, *rest), e.g. new keys (B, Hkv, T, D) or positions (B, Hkv, T).
        dst: None when uniform, else the (B * Hkv * T,) flat slots to write, from `_new_slots`.
        """
        B, H, T = values.shape[:3]
        if dst is None:
            a = self.length[0]
            buf.view(B, H, self.cap[0], *buf.shape[1:])[:, :, a : a + T] = values
            return
        buf.index_copy_(0, dst, values.reshape(B * H * T, *values.shape[3:]).to(buf.dtype))

    def _new_slots(self, T: int) -> Tensor | None:
        """The flat slots of T tokens appended to every segment, in (b, h, t) order; None when uniform."""
        if self.is_uniform():
            return None
        if self.n_segments * T <= 1024:  # a decode step: one small copy from the host lists
            ends = [s + L for s, L in zip(self.start, self.length, strict=True)]
            return host_tensor([e + t for e in ends for t in range(T)], self.k.device)
        start, length = self.segment_tensors()
        return ((start + length)[:, None] + torch.arange(T, device=start.device)).view(-1)

    # ----------------------------------------------------------------------------- mutations
    def _changed(self, removed: bool) -> None:
        """Called by every removal and truncation: a removal starts a new version. Slots leave the layer,
        so a count of 0 pad slots stays 0; any other count is recounted on next read."""
        if self._n_invalid != 0:
            self._n_invalid = None
        if removed:
            self._history = [next(_versions)]

    def _relayout(self) -> None:
        """start / cap (and maybe length) were replaced: derived layout state is rebuilt on next use."""
        self._uniform, self._start_t, self._len_t = None, None, None

    def _move_segments(self, segs: Sequence[int], new_cap: Sequence[int]) -> None:
        """Move segments `segs` into fresh buffers, in that order (the others are dropped), segment
        segs[j] with capacity new_cap[j] (>= its length); lengths follow, layout state is rebuilt.

        One slice copy per segment and buffer (several times faster on CPU than one index gather and
        scatter of every slot); the spare capacity holds zeros (positions -1).
        """
        starts = list(itertools.accumulate(new_cap, initial=0))
        total = starts.pop()

        def move(buf: Tensor, fill: float | int = 0) -> Tensor:
            out = buf.new_full((total, *buf.shape[1:]), fill)
            for i, new in zip(segs, starts, strict=True):
                s, L = self.start[i], self.length[i]
                out[new : new + L] = buf[s : s + L]
            return out

        self.k, self.v, self.pos = move(self.k), move(self.v), move(self.pos, -1)
        self.acc = {name: move(a) for name, a in self.acc.items()}
        self.start, self.length, self.cap = starts, [self.length[i] for i in segs], list(new_cap)
        self._relayout()

    def _reallocate(self, new_cap: Sequence[int]) -> None:
        """Give every segment capacity `new_cap` (>= current lengths), in fresh buffers."""
        len_t = self._len_t
        self._move_segments(range(self.n_segments), new_cap)
        self._len_t = len_t  # lengths did not move

    def append(self, k: Tensor, v: Tensor, pos: Tensor, n_pad: int | None = None) -> None:
        """Append T new tokens to every segment (their slots are the last T of each segment).

        Args:
            k, v: (B, Hkv, T, D) keys (after RoPE) and values.
            pos: (B, T) absolute positions; -1 for left-padding tokens.
            n_pad: the number of -1 entries in `pos`, if the caller knows it (the model passes 0 when it
                did not left-pad); None counts them, which reads the device.
        """
        B, H, T, D = k.shape
        if (B, H, D) != (self.batch, self.n_kv_heads, self.head_dim):
            raise ValueError(
                f"append: keys of {B} rows x {H} KV heads x head dim {D}, the layer holds "
                f"{self.batch} rows x {self.n_kv_heads} x {self.head_dim}"
            )
        if n_pad is None and self._n_invalid is not None:
            n_pad = int((pos < 0).sum())
        if self.k.numel() == 0 and sum(self.length) == 0:  # first fill: allocate exactly, uniform layout
            self.k = k.reshape(B * H * T, D).to(self.k.dtype).clone()
            self.v = v.reshape(B * H * T, D).to(self.v.dtype).clone()
            self.pos = pos[:, None, :].expand(B, H, T).reshape(-1).clone()
            self.start, self.length, self.cap = [i * T for i in range(B * H)], [T] * (B * H), [T] * (B * H)
            self.acc = {name: torch.zeros(B * H * T, device=self.k.device) for name in self.acc}
            self._relayout()
        else:
            if any(L + T > c for L, c in zip(self.length, self.cap, strict=True)):
                reduced = self.k.device.type == "cpu" and self.k.dtype in (torch.bfloat16, torch.float16)
                align = CAP_ALIGN if reduced else 1
                self._reallocate(
                    [
                        max(c, L + T + headroom(L + T, align))
                        for L, c in zip(self.length, self.cap, strict=True)
                    ]
                )
            dst = self._new_slots(T)
            self._write_new(self.k, k, dst)
            self._write_new(self.v, v, dst)
            self._write_new(self.pos, pos[:, None, :].expand(B, H, T), dst)
            for a in self.acc.values():
                self._write_new(a, a.new_zeros(B, H, T), dst)
            self.length = [L + T for L in self.length]
            self._len_t = None  # rebuilt from the list when next needed (a decode step needs none)
        if self._n_invalid is not None and n_pad is not None:
            self._n_invalid += n_pad * H

    def keep(self, slots: Sequence[Tensor]) -> None:
        """Compact: segment i keeps the slots `slots[i]` (indices into the segment, in the given order).

        Buffers are re-allocated to exactly the kept size, so memory follows the tokens kept.
        """
        if len(slots) != self.n_segments:
            raise ValueError(f"keep() needs {self.n_segments} index tensors, got {len(slots)}")
        dev = self.k.device
        n = [len(s) for s in slots]
        local = torch.cat([s.to(device=dev, dtype=torch.long).reshape(-1) for s in slots])
        counts = host_tensor(n, dev)
        start, length = self.segment_tensors()
        bound = torch.repeat_interleave(length, counts, output_size=len(local))
        if len(local) and bool(((local < 0) | (local >= bound)).any()):  # one device read for all segments
            i = next(
                i
                for i, s in enumerate(slots)
                if len(s) and (int(s.min()) < 0 or int(s.max()) >= self.length[i])
            )
            raise IndexError(f"segment {i}: slot index out of range [0, {self.length[i]})")
        gather = local + torch.repeat_interleave(start, counts, output_size=len(local))
        self.k, self.v, self.pos = self.k[gather], self.v[gather], self.pos[gather]
        self.acc = {name: a[gather] for name, a in self.acc.items()}
        self.length = n
        self.cap = list(self.length)
        self.start = [0] * self.n_segments
        for i in range(1, self.n_segments):
            self.start[i] = self.start[i - 1] + self.length[i - 1]
        self._relayout()
        self._len_t = counts
        self._changed(removed=True)

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only batch rows `rows` (distinct, in the given order): their segments, with their slots,
        slot order and spare capacity, move into fresh buffers; the other rows' memory is freed.

        One slice copy per kept segment and buffer (`_move_segments`). Used to stop decoding rows that
        have finished (`generate.stream(..., drop_finished=True)`).
        """
        rows = _check_rows(rows, self.batch)
        H = self.n_kv_heads
        segs = [b * H + h for b in rows for h in range(H)]
        self._move_segments(segs, [self.cap[i] for i in segs])
        self.batch = len(rows)
        self._changed(removed=True)

    def remove_slot(self, i: int, slot: int) -> None:
        """Evict one slot of segment i in O(1): its last slot moves into the freed one."""
        s, L = self.start[i], self.length[i]
        if not 0 <= slot < L:
            raise IndexError(f"segment {i}: slot {slot} out of range [0, {L})")
        last = s + L - 1
        if slot != L - 1:
            for buf in (self.k, self.v, self.pos, *self.acc.values()):
                buf[s + slot] = buf[last]
        self.length[i] = L - 1
        self._uniform, self._len_t = None, None
        self._changed(removed=True)

    def remove_slots(self, slots: Tensor) -> None:
        """Evict one slot of every segment at once: slots (n_segments,) long, slot slots[i] of segment i.

        The vectorized `remove_slot` (the common decode-time eviction: one token in, one out per head):
        each segment's last slot moves into its freed one, with no loop over segments and no device
        read. Every segment must hold at least one slot; the indices are checked only on the CPU.
        """
        if slots.shape != (self.n_segments,):
            raise ValueError(
                f"remove_slots() needs {self.n_segments} slot indices, got shape {tuple(slots.shape)}"
            )
        if min(self.length) < 1:
            raise IndexError("remove_slots(): every segment must hold a slot")
        start, length = self.segment_tensors()
        slots = slots.to(device=self.k.device, dtype=torch.long)
        if slots.device.type == "cpu" and bool(((slots < 0) | (slots >= length)).any()):
            i = int(((slots < 0) | (slots >= length)).nonzero()[0])
            raise IndexError(f"segment {i}: slot {int(slots[i])} out of range [0, {self.length[i]})")
        dst, src = start + slots, start + length - 1
        for buf in (self.k, self.v, self.pos, *self.acc.values()):
            buf.index_copy_(0, dst, buf[src])
        self.length = [L - 1 for L in self.length]
        self._uniform, self._len_t = None, length - 1
        self._changed(removed=True)

    def checkpoint(self) -> int:
        """Start a new version and return it: the handle `truncate_to` needs to come back here."""
        v = next(_versions)
        self._history.append(v)
        return v

    def check_truncate(self, version: int, lengths: Sequence[int]) -> str | None:
        """None if `truncate_to(version, lengths)` is exact, else why not (nothing is changed)."""
        if version not in self._history:
            return (
                "slots were evicted since it was taken (keep / remove_slot), the cache was truncated "
                "to an earlier snapshot in between, or the snapshot is of another cache"
            )
        if len(lengths) != self.n_segments or any(a > b for a, b in zip(lengths, self.length, strict=True)):
            return f"its lengths {list(lengths)} do not fit the cache's {self.length}"
        return None

    def truncate_to(self, version: int, lengths: Sequence[int]) -> None:
        """Drop the slots appended since `checkpoint()` returned `version` (segment i keeps lengths[i]).

        Raises CacheError if that is not exact (see `check_truncate`).
        """
        if (why := self.check_truncate(version, lengths)) is not None:
            raise CacheError(f"cannot truncate this layer to version {version}: {why}")
        del self._history[self._history.index(version) + 1 :]  # later snapshots are gone for good
        self.length = list(lengths)
        self._uniform, self._len_t = None, None
        self._changed(removed=False)

    def accumulator(self, name: str) -> Tensor:
        """The per-slot float32 accumulator `name` (N,), created at zero on first use."""
        if name not in self.acc:
            self.acc[name] = torch.zeros(self.pos.shape[0], device=self.k.device)
        return self.acc[name]

    def set_newest(self, name: str, values: Tensor) -> None:
        """Set accumulator `name` on the newest T slots of every segment to values (B, Hkv, T): per-token
        state known when a token arrives (TRIM-KV's retention), written right after `append`."""
        acc, (B, H, T) = self.accumulator(name), values.shape
        if self.is_uniform():
            a = self.length[0] - T
            acc.view(B, H, self.cap[0])[:, :, a : a + T] = values
            return
        start, length = self.segment_tensors()
        dst = ((start + length - T)[:, None] + torch.arange(T, device=start.device)).view(-1)
        acc.index_copy_(0, dst, values.reshape(-1).to(acc.dtype))

    def add_to_accumulator(self, name: str, values: Tensor) -> None:
        """Add `values` (B, Hkv, S) in `dense()` layout to accumulator `name` (S >= the longest segment)."""
        acc, B, H = self.accumulator(name), self.batch, self.n_kv_heads
        if self.is_uniform():
            L = self.length[0]
            acc.view(B, H, self.cap[0])[:, :, :L] += values[:, :, :L]
            return
        idx, valid = self._dense_index()
        vals = values.reshape(self.n_segments, -1)[:, : idx.shape[1]].to(acc.dtype)
        acc.index_add_(0, idx.view(-1), torch.where(valid, vals, 0.0).view(-1))  # padding adds 0 to slot 0

    @classmethod
    def cat_rows(cls, layers: Sequence[LayerCache]) -> LayerCache:
        """The rows of `layers` (same heads, head dim, dtype, device) stacked into one layer, in order.

        Segments keep their own lengths and slot order (ragged layers included); buffers hold exactly the
        slots in use (like `keep`). Accumulators are carried over (zeros for a layer that lacks one).
        The result has a fresh version: it cannot be truncated to a snapshot of its parts.
        """
        if not layers:
            raise ValueError("cat_rows needs at least one layer")
        first = layers[0]
        H, D, dtype, dev = first.n_kv_heads, first.head_dim, first.k.dtype, first.k.device
        for x in layers:
            if (x.n_kv_heads, x.head_dim, x.k.dtype, x.k.device) != (H, D, dtype, dev):
                raise ValueError(
                    f"cat_rows: a layer of {x.n_kv_heads} KV heads x {x.head_dim} ({x.k.dtype}, "
                    f"{x.k.device}) does not stack with one of {H} x {D} ({dtype}, {dev})"
                )
        out = cls(sum(x.batch for x in layers), H, D, dtype, dev)
        idx = [x._dense_index() for x in layers]
        used = [ix[va] for x, (ix, va) in zip(layers, idx, strict=True)]  # in-use slots, segment order
        out.k = torch.cat([x.k[u] for x, u in zip(layers, used, strict=True)])
        out.v = torch.cat([x.v[u] for x, u in zip(layers, used, strict=True)])
        out.pos = torch.cat([x.pos[u] for x, u in zip(layers, used, strict=True)])
        names = dict.fromkeys(name for x in layers for name in x.acc)
        out.acc = {
            name: torch.cat(
                [
                    x.acc[name][u] if name in x.acc else torch.zeros(len(u), device=dev)
                    for x, u in zip(layers, used, strict=True)
                ]
            )
            for name in names
        }
        out.length = [L for x in layers for L in x.length]
        out.cap = list(out.length)
        out.start = [0] * out.n_segments
        for i in range(1, out.n_segments):
            out.start[i] = out.start[i - 1] + out.length[i - 1]
        counts = [x._n_invalid for x in layers]
        out._n_invalid = None if None in counts else sum(counts)
        out._relayout()
        return out

    def copy(self) -> LayerCache:
        """A deep copy (same version history: the copy can be truncated to the original's snapshots)."""
        c = LayerCache.__new__(LayerCache)
        c.__dict__.update(self.__dict__)
        c.k, c.v, c.pos = self.k.clone(), self.v.clone(), self.pos.clone()
        c.acc = {n: a.clone() for n, a in self.acc.items()}
        c.start, c.length, c.cap = list(self.start), list(self.length), list(self.cap)
        c._history = list(self._history)
        return c


class CacheSnapshot(NamedTuple):
    """What `KVCache.truncate_to` needs to come back: lengths, position counter, and layer versions."""

    lengths: list[list[int]]  # per layer, per segment (as `LayerCache.length`)
    seen: Tensor  # (B,) the position counter
    versions: list[int]  # per layer, from `LayerCache.checkpoint`


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

    @classmethod
    def cat_rows(cls, caches: Sequence[KVCache]) -> KVCache:
        """Several caches' rows as one batch, in order: e.g. single-row caches compressed by different
        presses (ragged or not, different lengths per head and different position counters) decoded
        together. Each row's attention, positions and eviction are those of its own cache.

            >>> a, b = KVCache.empty(1, 1, 2, 4), KVCache.empty(1, 1, 2, 4)
            >>> a.layers[0].append(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), a.next_positions(5))
            >>> b.layers[0].append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), b.next_positions(3))
            >>> a.layers[0].keep([torch.tensor([0, 4]), torch.tensor([1, 2, 3])])
            >>> both = KVCache.cat_rows([a, b])
            >>> both.layers[0].lengths(), both.seen.tolist()
            ([[2, 3], [3, 3]], [5, 3])

        The parts are not modified (their K/V are copied). Raises ValueError if the caches differ in
        layers, KV heads, head dim, dtype or device. Snapshots of the parts do not apply to the result.
        """
        if not caches:
            raise ValueError("cat_rows needs at least one cache")
        n_layers = {len(c.layers) for c in caches}
        if len(n_layers) != 1:
            raise ValueError(f"cat_rows: the caches have different numbers of layers {sorted(n_layers)}")
        new = KVCache.__new__(KVCache)
        new.layers = [
            LayerCache.cat_rows([c.layers[i] for c in caches]) for i in range(len(caches[0].layers))
        ]
        new.seen = torch.cat([c.seen for c in caches])
        return new

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only batch rows `rows` (distinct, in the given order) in every layer and the position
        counter; their memory is all that stays allocated. E.g. a batch decode drops its finished rows::

            >>> c = KVCache.empty(1, 3, 1, 4)
            >>> c.layers[0].append(torch.randn(3, 1, 2, 4), torch.randn(3, 1, 2, 4), c.next_positions(2))
            >>> c.keep_rows([2, 0])
            >>> c.batch, c.layers[0].lengths()
            (2, [[2], [2]])

        Raises ValueError for an empty, repeated or out-of-range row. Snapshots taken before do not apply.
        """
        rows = _check_rows(rows, self.batch)
        for layer in self.layers:
            layer.keep_rows(rows)
        self.seen = self.seen[torch.tensor(rows, device=self.seen.device)]

    def fork(self) -> KVCache:
        """A deep copy (for trying several presses on one prefill). It can be truncated to snapshots of
        the original taken before the fork, and to its own."""
        new = KVCache.__new__(KVCache)
        new.seen = self.seen.clone()
        new.layers = [layer.copy() for layer in self.layers]
        return new

    def snapshot(self) -> CacheSnapshot:
        """A point to come back to with `truncate_to`: lengths per layer, position counter, versions.

        Used to reuse one compressed context for several questions: appended slots are always at the
        end of their segments, so dropping them is exact as long as no slot was evicted in between.
        """
        return CacheSnapshot(
            [list(layer.length) for layer in self.layers],
            self.seen.clone(),
            [layer.checkpoint() for layer in self.layers],
        )

    def truncate_to(
        self,
        snapshot: CacheSnapshot | list[list[int]],
        seen: Tensor | None = None,
        versions: Sequence[int] | None = None,
    ) -> None:
        """Drop every slot appended after `snapshot` and restore the position counter.

        Call as `truncate_to(snap)` or `truncate_to(*snap)`. All or nothing: raises CacheError, and
        changes nothing, if any layer had slots evicted (keep, remove_slot) since the snapshot, or was
        truncated to an earlier snapshot in between (the slots after that point are no longer these).
        Truncating to the same snapshot again and again (one context, many questions) is fine.
        """
        snap = snapshot if isinstance(snapshot, CacheSnapshot) else CacheSnapshot(snapshot, seen, versions)
        if snap.versions is None or snap.seen is None:
            raise CacheError("truncate_to needs a snapshot taken with KVCache.snapshot()")
        if len(snap.lengths) != len(self.layers) or len(snap.versions) != len(self.layers):
            raise CacheError(f"this snapshot has {len(snap.lengths)} layers, the cache {len(self.layers)}")
        for i, (layer, ls, ver) in enumerate(zip(self.layers, snap.lengths, snap.versions, strict=True)):
            if (why := layer.check_truncate(ver, ls)) is not None:
                raise CacheError(f"cannot truncate layer {i} to this snapshot: {why}")
        for layer, ls, ver in zip(self.layers, snap.lengths, snap.versions, strict=True):
            layer.truncate_to(ver, ls)
        self.seen = snap.seen.clone()
