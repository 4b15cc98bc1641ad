"""Write a new token saliency score in a few lines and run it through SnapKV and AdaKV.

A score is a pure function of a `ScoreInputs` bundle (one layer's observation queries, keys, values and
positions) that returns (B, Hkv, n) float32, higher = keep. `inp.terms` shares what every score needs:
attention A and logits z per (query head, query, slot), value norms, output inner products. Registering
it under a name makes `<policy>-<name>` and `adakv-<policy>-<name>` valid press names everywhere
(`make_press`, `obinfer generate --press`, `obinfer inspect`, `obinfer eval`).

The score below, `avnorm`, is attention times value norm, sum_i A_ip ||v_p|| (the idea of VATP,
arXiv 2406.12335): the size of the output change when value v_p is zeroed, not squared. OBCache's
`obv` is its OBD cousin, sum_i A_ip^2 ||v_p||^2.

    python examples/custom_score.py --compression-ratio 0.75
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sample_document import DOCUMENT, QUESTIONS
from torch import Tensor

import obinfer
from obinfer.cache.presses import make_press
from obinfer.cache.scores import ScoreInputs, register_score
from obinfer.generate import GenStats, generate


@register_score("avnorm")
def attention_times_value_norm(inp: ScoreInputs) -> Tensor:
    """sum over observation queries i and the G query heads of a KV head of A_ip * ||v_p||.

    Returns:
        (B, Hkv, n) float32 scores, -inf on invalid slots.
    """
    t = inp.terms  # A: (B, Hkv, G, W, n); v2 = ||v_p||^2: (B, Hkv, 1, 1, n)
    term = t.A * t.v2.sqrt()  # (B, Hkv, G, W, n)
    return term.sum(dim=(2, 3)).masked_fill(~inp.valid, float("-inf"))


def main(argv: list[str] | None = None) -> dict[str, tuple[list[tuple[int, float, int]], str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--context-file", help="the document (default: examples/sample_document.py)")
    p.add_argument("--question", default=QUESTIONS[1])
    p.add_argument("--compression-ratio", type=float, default=0.75)
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)

    model, tok = obinfer.load(args.model)  # a name, a directory or a hub id; default: the embedded model
    document = Path(args.context_file).read_text() if args.context_file else DOCUMENT
    prefix, suffix = tok.chat_parts() if tok.has_chat_template else ("", "\n")
    doc_ids = tok.encode(prefix + document)
    q_ids = tok.encode("\n\n" + args.question + suffix, add_bos=False)

    results = {}
    for name in ("snapkv", "snapkv-avnorm", "adakv-snapkv-avnorm"):
        press, stats = make_press(name, compression_ratio=args.compression_ratio), GenStats()
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
        lo, mean, hi = stats.kept_per_layer[-1]  # kept document tokens + question + answer, per KV head
        print(
            f"{name:20s} last layer holds {lo}-{hi} tokens per head (mean {mean:.0f}) after answering: {answer}"
        )
        results[name] = (stats.kept_per_layer, answer)
    return results


if __name__ == "__main__":
    main()
