"""Generate text with the Python API: load a checkpoint, wrap the prompt in the chat template, stream.

python examples/generate_text.py --prompt "What is the capital of France?"
"""

from __future__ import annotations

import argparse

import obinfer
from obinfer.generate import GenStats, Sampling, generate
from obinfer.prompts import build_prompt


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model, tok = obinfer.load(args.model)  # a name, a directory or a hub id; default: the embedded model
    ids = build_prompt(tok, args.prompt).prefill  # in the chat template when the model has one

    stats, dec, out = GenStats(), tok.stream_decoder(skip_special=True), []
    sampling = Sampling(temperature=args.temperature, seed=args.seed)
    for t in generate(
        model, ids, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_ids=tok.stop_ids, stats=stats
    ):
        out.append(t)
        print(dec.push(t), end="", flush=True)
    print(dec.flush())
    print(f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new, {stats.decode_tok_s:.1f} tok/s]")
    return tok.decode(out, skip_special=True)


if __name__ == "__main__":
    main()
