"""Prefill once, compress for many presses.

Compressing a layer at prefill never changes that layer's forward pass (the press runs after the
layer's attention) and the next layer's input does not depend on the layer's cache. So one
uncompressed prefill can serve any number of presses: record each layer's queries, then for each press
fork the full cache and run exactly the press's prefill compression on the recorded queries, layer by
layer. The result is the cache the press would have produced inside its own prefill (same kept
positions, same K/V, same policy state; tests/test_fanout.py checks it for every policy and allocator).

    >>> from obinfer.cache.fanout import Fanout
    >>> presses = [make_press("snapkv-obk", compression_ratio=0.5), make_press("adakv-h2o", budget=8)]
    >>> fan = Fanout(model, ids, presses)   # one prefill; queries recorded as the presses need them
    >>> cache = fan.compress(presses[0])    # a compressed fork
    >>> cache, scores = fan.compress(presses[1], with_scores=True)   # scores by position
    >>> tuple(scores.shape) == (model.cfg.n_layers, model.cfg.n_kv_heads, len(ids))
    True

Only the queries the presses read are kept: per layer the last `max(Press.queries_needed(n))` of them
(every query if a policy observes them all, e.g. H2O; at least the last one). Budget-independent scores
(`Policy.score`) are computed once per layer for each (policy, score, gqa) and reused by every
compression ratio, budget, allocator and layer budget of it.

A press that looks ahead (LAQ, obinfer/cache/lookahead.py) gets what its own prefill would do too: its
base press compresses a fork (with the shared scores), the lookahead tokens are decoded on that fork
from the prefill's last logits (`Fanout.logits`), and the full fork is compressed with their queries.

Used by `obinfer eval` (obinfer/eval/runner.py, one prefill per sample) and `obinfer inspect`
(obinfer/inspect/run.py, the kept sets and scores of the presses compared).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from obinfer.cache import attention
from obinfer.cache.kv_cache import KVCache, LayerCache
from obinfer.cache.presses import Press, PressRun


class Fanout:
    """One uncompressed prefill of one prompt, and compressed forks of it.

    Args:
        model: a `Transformer` (anything with `new_cache(batch)`, `device` and the forward signature
            `model(ids, cache, observer=..., last_only=True)`).
        ids: the prompt's token ids (one row).
        presses: every press `compress` will be asked for (they decide how many queries are recorded).

    Attributes:
        cache: the uncompressed cache after the prefill (do not modify it; `compress` forks it).
        n: prompt tokens.
        n_queries: queries recorded per layer (the last ones of the prompt).
        outputs: layer -> the layer's attention outputs of its last queries, for presses whose policy
            reuses them (`Policy.reuses_outputs`); empty when none does.
        prefill_s: seconds the prefill took.
        logits: (1, V) the prefill's last logits.
    """

    def __init__(self, model: Any, ids: Sequence[int], presses: Iterable[Press] = ()) -> None:
        self.n = len(ids)
        if self.n == 0:
            raise ValueError("Fanout needs a non-empty prompt")
        self.model = model
        presses = list(presses)
        self.presses = presses
        self.n_queries = max([1, *(p.queries_needed(self.n) for p in presses)])
        self.q: dict[int, Tensor] = {}  # layer -> (1, Hq, n_queries, D)
        self.q_pos: dict[int, Tensor] = {}  # layer -> (1, n_queries)
        self._memos: dict[Any, dict[int, Tensor]] = {}
        self._consumed = False
        keep = self.n_queries

        def record(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
            if keep >= q.shape[2]:
                self.q[idx], self.q_pos[idx] = q, q_pos
            else:  # copies, so the full (B, Hq, T, D) tensor is not kept alive
                self.q[idx], self.q_pos[idx] = q[:, :, -keep:].clone(), q_pos[:, -keep:].clone()

        # policies that read each layer's input (TRIM-KV's gates) write their per-token state into the
        # shared cache during the prefill; forks carry it (one state per accumulator name)
        inputs = {p.start(model=model).policy for p in presses if not p.is_full and p.policy.needs_input}
        if inputs:

            def observe_input(idx: int, x: Tensor, pos: Tensor, layer: LayerCache) -> None:
                for pol in inputs:
                    pol.observe_input(idx, x, pos, layer)

            record.observe_input = observe_input  # type: ignore[attr-defined]

        # a policy that reuses the layer's attention outputs (SnapKV's window: `Policy.reuses_outputs`)
        # gets them here too, as in its own prefill, so a fork is compressed exactly as that prefill does
        self.outputs: dict[int, Tensor] = {}  # layer -> (1, Hq, n_outputs, D)
        reusing = [p for p in presses if not p.is_full and not p.looks_ahead and p.policy.reuses_outputs]
        n_out = min(self.n, max((p.queries_needed(self.n) for p in reusing), default=0))
        if n_out:

            def attend_and_observe(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> Tensor:
                out = attention.attend(layer, q, q.shape[2])  # the model's own call (`Attention.forward`)
                self.outputs[idx] = out if n_out >= out.shape[2] else out[:, :, -n_out:].clone()
                record(idx, q, q_pos, layer)
                return out

            record.attend_and_observe = attend_and_observe  # type: ignore[attr-defined]

        t0 = time.perf_counter()
        self.cache: KVCache = model.new_cache(1)
        with torch.inference_mode():
            self.logits = model(
                torch.tensor([list(ids)], device=model.device), self.cache, observer=record, last_only=True
            )[:, -1]
        self.prefill_s = time.perf_counter() - t0
        self._input_accs = set(self.cache.layers[0].acc)  # written by the prefill: per-token input state

    def compress(
        self, press: Press, *, run: PressRun | None = None, in_place: bool = False, with_scores: bool = False
    ) -> KVCache | tuple[KVCache, Tensor]:
        """The cache `press` would have produced in its own prefill of the prompt.

        Args:
            run: the press run to fill (timings, bytes_before, observed_queries, head_budgets; continue
                decode-time eviction with `run.decode_observer()`); a fresh `press.start()` if None.
            in_place: compress `self.cache` itself instead of a fork (saves a copy for the last press;
                the fanout cannot compress again afterwards).
            with_scores: also return the scores the press ranked the slots by, before compaction, as
                (L, Hkv, n) float32 on the CPU by position (row 0; +inf protected, -inf no slot).
        Returns:
            The compressed cache, or (cache, scores) with `with_scores`.
        Raises:
            ValueError: the press reads more queries than were recorded (it was not among `presses`),
                or the fanout's cache was already compressed in place.
        """
        if self._consumed:
            raise ValueError("this Fanout's cache was compressed in place; it cannot serve another press")
        if press.queries_needed(self.n) > self.n_queries:
            raise ValueError(
                f"press {press.name} reads the last {press.queries_needed(self.n)} queries but only "
                f"{self.n_queries} were recorded: pass it to Fanout(..., presses)"
            )
        if run is not None and run.press != press:
            raise ValueError(f"the run is one of press {run.press.name}, not of {press.name}")
        if run is None:
            run = press.start(keep_scores=with_scores, model=self.model)
        elif with_scores and run.scores is None:
            run.scores = {}
        run._bind(self.model)
        if run.memo is None and not press.is_full and not press.looks_ahead:
            run.memo = self._memo_for(press, run.policy)
            run.shared_memos = self._siblings(press, run) if run.memo is not None else []
        cache = self.cache if in_place else self.cache.fork()
        self._consumed = in_place
        foreign = self._input_accs - set(() if press.is_full else run.policy.input_accumulators())
        for layer in cache.layers if foreign else ():  # another press's per-token state: not this one's
            for name in foreign:
                layer.acc.pop(name, None)
        if press.looks_ahead:
            with torch.inference_mode():
                run.compress_lookahead(
                    cache, self.logits, self.q, self.q_pos, base_memo=self._memo_for(press.base_press)
                )
            return cache if not with_scores else (cache, self._by_position(run))
        observe = run.prefill_observer()
        if observe is not None:
            with torch.inference_mode():
                for i, layer in enumerate(cache.layers):
                    observe(i, self.q[i], self.q_pos[i], layer, outputs=self.outputs.get(i))
        if not with_scores:
            return cache
        return cache, self._by_position(run)

    def _memo_for(self, press: Press, policy: Any = None) -> dict[int, Tensor] | None:
        """The shared layer -> scores dict of press's (policy, score, gqa), the policy bound to the model
        if given (`PressRun.policy`); None if the policy is unhashable."""
        key = (press.policy if policy is None else policy, press.score, press.gqa)
        try:
            return self._memos.setdefault(key, {})
        except TypeError:  # a policy with unhashable options: score it every time
            return None

    def _siblings(self, press: Press, run: PressRun) -> list[tuple[Any, dict[int, Tensor]]]:
        """(score function, memo) of the other scores that this fanout's presses use with the same policy
        and gqa as `press`: `PressRun` fills their memos from its own scoring pass (`Policy.score_many`)."""
        if run.policy != press.policy or not press.policy.uses_score:
            return []  # a policy bound to the model (TRIM-KV's gates) keeps its own scoring
        out, seen = [], {press.score}
        for p in self.presses:
            if (
                p.is_full
                or p.looks_ahead
                or p.score in seen
                or (p.policy, p.gqa) != (press.policy, press.gqa)
            ):
                continue
            seen.add(p.score)
            memo = self._memo_for(p, run.policy)
            if memo is not None:
                out.append((p.score_fn, memo))
        return out

    def _by_position(self, run: PressRun) -> Tensor:
        return scores_by_position(
            run.scores or {}, len(self.cache.layers), self.cache.layers[0].n_kv_heads, self.n
        )


def scores_by_position(scores: dict[int, tuple[Tensor, Tensor]], L: int, H: int, n: int) -> Tensor:
    """`PressRun.scores` (layer -> (scores, slot positions), row 0) as (L, H, n) float32 on the CPU by
    position; -inf where no slot holds a position."""
    out = torch.full((L, H, n), -math.inf)
    for i, (s, pos) in scores.items():
        valid = pos[0] >= 0
        for h in range(H):
            out[i, h, pos[0, h][valid[h]].cpu()] = s[0, h][valid[h]].float().cpu()
    return out
