"""Compare which tokens two presses keep on one document, layer by layer (and draw it).

One uncompressed prefill serves both presses: `obinfer.inspect.run_presses` (built on
`obinfer.cache.fanout.Fanout`) lets each press compress its own fork of it, so the kept sets are those
of a real compressed run.

    python examples/compare_presses.py --presses snapkv,snapkv-obk --out compare.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sample_document import DOCUMENT, NEEDLE

import obinfer
from obinfer.cache.presses import make_press
from obinfer.inspect import Inspection, find_text, plot_inspection, run_presses


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--context-file", help="the document (default: examples/sample_document.py)")
    p.add_argument("--presses", default="snapkv,snapkv-obk", help="two press names, comma-separated")
    p.add_argument("--compression-ratio", type=float, default=0.75)
    p.add_argument(
        "--highlight-text", default=NEEDLE.split()[-1].rstrip("."), help="text to mark in the picture"
    )
    p.add_argument("--out", help="also draw the kept positions into this PNG")
    args = p.parse_args(argv)

    model, tok = obinfer.load(args.model)  # a name, a directory or a hub id; default: the embedded model
    document = Path(args.context_file).read_text() if args.context_file else DOCUMENT
    ids = tok.encode(document)
    presses = [make_press(name, compression_ratio=args.compression_ratio) for name in args.presses.split(",")]
    a, b = run_presses(model, ids, presses)

    overlaps = []  # per layer: |A and B| / |A or B| over the (head, position) pairs kept
    print(f"{len(ids)} tokens; layer: tokens kept by both / by either, over all KV heads")
    for i, (ka, kb) in enumerate(zip(a.kept, b.kept, strict=True)):
        sa = {(h, pos) for h, ps in enumerate(ka) for pos in ps}
        sb = {(h, pos) for h, ps in enumerate(kb) for pos in ps}
        overlaps.append(len(sa & sb) / len(sa | sb))
        print(
            f"  layer {i:2d}: {overlaps[-1]:6.1%}  only {a.name}: {len(sa - sb):4d}  only {b.name}: {len(sb - sa):4d}"
        )
    if args.out:
        pieces = [tok.decode([t]) for t in ids]
        marks = find_text(pieces, args.highlight_text) if args.highlight_text in document else []
        print("wrote", plot_inspection(Inspection(pieces, [a, b], marks), args.out))
    return overlaps


if __name__ == "__main__":
    main()
