"""Compress a document once, then ask it several questions.

The document is prefilled once with a press, which compresses every layer's cache right after that
layer's attention. `KVCache.snapshot()` remembers the compressed state; after each answer,
`KVCache.truncate_to(...)` drops the question and answer tokens, so the next question starts from the
same compressed document (query-agnostic compression: the questions come at positions after the
uncompressed document).

    python examples/ask_many_questions.py --press adakv-snapkv-obk --compression-ratio 0.5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sample_document import DOCUMENT, QUESTIONS

import obinfer
from obinfer.cache.presses import make_press
from obinfer.generate import stream
from obinfer.prompts import build_prompt


def main(argv: list[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--context-file", help="the document (default: examples/sample_document.py)")
    p.add_argument(
        "--question", action="append", help="a question (repeatable; default: three about the sample)"
    )
    p.add_argument("--press", default="snapkv-obk", help="a press name, or full for no compression")
    p.add_argument("--compression-ratio", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)

    model, tok = obinfer.load(args.model)  # a name, a directory or a hub id; default: the embedded model
    document = Path(args.context_file).read_text() if args.context_file else DOCUMENT
    questions = args.question or QUESTIONS
    # the one prompt builder: the document is prefilled (and compressed), each question comes after it
    prompts = [build_prompt(tok, document, q) for q in questions]

    # 1. prefill the document once; the press compresses each layer during the forward pass
    doc_ids = prompts[0].prefill
    press = make_press(args.press, compression_ratio=args.compression_ratio)  # FULL for "full"
    cache = model.new_cache()
    with torch.inference_mode():
        observer = press.prefill_observer()  # None for FULL: nothing to compress
        model(torch.tensor([doc_ids]), cache, observer=observer, last_only=True)
    print(
        f"{len(doc_ids)} document tokens, {cache.n_tokens():,} cached (layer, head, token) slots ({args.press})"
    )
    saved = cache.snapshot()  # lengths per layer and head, the position counter, a version

    # 2. ask each question against the same compressed cache
    answers = {}
    for question, prompt in zip(questions, prompts, strict=True):
        steps = stream(
            model, [prompt.after], cache=cache, max_new_tokens=args.max_new_tokens, stop_ids=tok.stop_ids
        )
        out = [int(t[0]) for t in steps]
        answers[question] = tok.decode([t for t in out if t not in tok.stop_ids], skip_special=True).strip()
        print(f"Q: {question}\nA: {answers[question]}\n")
        cache.truncate_to(saved)  # forget this question and its answer
    return answers


if __name__ == "__main__":
    main()
