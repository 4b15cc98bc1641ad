"""Add an eviction policy and a budget allocator, each one registered definition, and run them.

A policy decides which prompt queries observe and what is always kept; registering it under a name makes
`<policy>`, `<policy>-<score>` (every registered score) and `<allocator>-<policy>...` valid press names
everywhere (`make_press`, `obinfer generate --press`, `obinfer inspect`, `obinfer eval`). An allocator
turns the policy's per-slot scores into the slots each KV head keeps; registering it adds the prefix
`<allocator>-` to every press name.

- `sinkwindow`: the last `window` prompt queries score the keys (like SnapKV, without pooling) and the
  first `sinks` tokens (attention sinks) are always kept. It declares the queries it reads
  (`observed_span`), so a shared prefill (`obinfer/cache/fanout.py`) records only those.
- `shared`: every KV head of a layer keeps the same slots, the best by the scores averaged over heads
  (what TOVA does inside its policy, here for any policy).

    python examples/custom_policy.py --compression-ratio 0.75
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sample_document import DOCUMENT, QUESTIONS
from torch import Tensor

import obinfer
from obinfer.cache.allocators import register_allocator, uniform
from obinfer.cache.fanout import Fanout
from obinfer.cache.policies import INF, Policy, check_int, register_policy
from obinfer.cache.presses import make_press
from obinfer.cache.scores import ScoreInputs
from obinfer.generate import GenStats, generate

PRESSES = ("snapkv", "sinkwindow", "sinkwindow-obk", "shared-sinkwindow", "shared-snapkv-obk")


@register_policy
class SinkWindow(Policy):
    """SinkWindow: the last `window` queries observe; the first `sinks` tokens are always kept."""

    name = "sinkwindow"
    window: int = 32
    sinks: int = 4

    def __post_init__(self) -> None:  # options are checked when the press is made
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "sinks", self.sinks, 0)

    def observed_span(self, n: int) -> tuple[int, int] | None:
        return (max(0, n - self.window), n)

    def score(self, q, q_pos, layer, score_fn, gqa) -> Tensor:  # noqa: ANN001
        k, v, pos = layer.dense()  # (B, Hkv, S, D), (B, Hkv, S, D), (B, Hkv, S)
        w = min(self.window, k.shape[2])
        s = score_fn(ScoreInputs(q[:, :, -w:], k, v, q_pos[:, -w:], pos, gqa))  # -inf on invalid slots
        return s.masked_fill((pos >= 0) & (pos < self.sinks), INF)


@register_allocator("shared")
def shared_slots(scores: Tensor, n_kept: Tensor) -> Tensor:
    """Shared slots: every KV head keeps the same slots, the best by the score averaged over heads."""
    finite = scores.nan_to_num(posinf=1e30, neginf=-1e30)  # protected / invalid stay on top / bottom
    mean = finite.mean(1, keepdim=True).masked_fill((scores == -INF).all(1, keepdim=True), -INF)
    return uniform(mean.expand_as(scores), n_kept)


def main(argv: list[str] | None = None) -> dict[str, tuple[str, list[list[list[int]]]]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model name, directory or hub id (default: the embedded model)")
    p.add_argument("--context-file", help="the document (default: examples/sample_document.py)")
    p.add_argument("--question", default=QUESTIONS[0])
    p.add_argument("--compression-ratio", type=float, default=0.75)
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)

    model, tok = obinfer.load(args.model)
    document = Path(args.context_file).read_text() if args.context_file else DOCUMENT
    prefix, suffix = tok.chat_parts() if tok.has_chat_template else ("", "\n")
    doc_ids = tok.encode(prefix + document)
    q_ids = tok.encode("\n\n" + args.question + suffix, add_bos=False)
    presses = [make_press(name, compression_ratio=args.compression_ratio) for name in PRESSES]

    # 1. one prefill serves every press: which positions each keeps (layer 0, row 0, per KV head)
    fan = Fanout(model, doc_ids, presses)
    kept = {press.name: fan.compress(press).kept_positions()[0][0] for press in presses}
    print(
        f"{len(doc_ids)} document tokens; {fan.n_queries} queries per layer recorded for {len(presses)} presses"
    )

    # 2. answer the question from each compressed document
    results = {}
    for press in presses:
        stats = GenStats()
        out = generate(
            model,
            doc_ids,
            press=press,
            question=q_ids,
            stats=stats,
            max_new_tokens=args.max_new_tokens,
            stop_ids=tok.stop_ids,
        )
        answer = tok.decode(list(out), skip_special=True).strip()
        heads = kept[press.name]
        same = all(h == heads[0] for h in heads)
        print(
            f"{press.name:20s} layer 0 keeps {[len(h) for h in heads]} tokens per head"
            f"{' (the same in every head)' if same else ''}, first {heads[0][:6]}; answer: {answer}"
        )
        results[press.name] = (answer, kept[press.name])
    return results


if __name__ == "__main__":
    main()
