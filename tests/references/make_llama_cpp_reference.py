"""Write llama.cpp's view of the embedded GGUF to ``llama_cpp_smollm2.json`` (a committed test reference).

llama.cpp is an independent implementation of the GGUF format, its tokenizer and the Llama forward pass,
so its tokenization and next-token logits check obinfer's GGUF import (dequantization, q/k row
un-permutation, tokenizer.json) without building llama.cpp in CI. Run it by hand where llama.cpp runs:

    pip install llama-cpp-python numpy          # compiles llama.cpp (minutes); not a test dependency
    python tests/references/make_llama_cpp_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Without a path it uses obinfer's own first-use copy (``obinfer.gguf_import.default_gguf_path``). The file
records the llama.cpp version and the GGUF's sha256; ``tests/test_gguf_reference.py`` compares against it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("llama_cpp_smollm2.json")
TOP_K = 16

# A varied tokenization corpus: digits, spaces, tabs, accents, CJK, emoji, Cyrillic, code, control tokens.
PIECES = ["Hello world", " 12345", "3.14159", "  multiple   spaces\n\n\tTabs", "naïve café résumé",
          "日本語のテキスト", "emoji 😀🎉", "<|im_start|>user\nHi<|im_end|>", "don't I'll", "a  1 22 333",
          "def f(x):\n    return x**2", "Привет мир", "1,000,000.00$", "\u00a0nbsp", "<repo_name>x"]  # fmt: skip
PROMPTS = [
    "The Eiffel Tower is in Paris, the capital of France. It was built in 1889 for the World's Fair.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
]


def corpus() -> list[str]:
    rng = np.random.default_rng(0)
    return PIECES + ["".join(rng.choice(PIECES, size=3)) for _ in range(60)]


def main() -> None:
    import llama_cpp
    from llama_cpp import Llama

    if len(sys.argv) > 1:
        gguf = Path(sys.argv[1])
    else:
        from obinfer.gguf_import import default_gguf_path

        gguf = default_gguf_path()
    model = Llama(model_path=str(gguf), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    meta = model.metadata
    tokens = {text: model.tokenize(text.encode(), add_bos=False, special=True) for text in corpus()}
    prompts = []
    for text in PROMPTS:
        ids = model.tokenize(text.encode(), add_bos=False, special=True)
        model.reset()
        model.eval(ids)
        scores = np.asarray(model.scores[: len(ids)], dtype=np.float64)
        top = np.argsort(-scores, axis=-1)[:, :TOP_K]
        prompts.append({
            "text": text,
            "ids": ids,
            "top_ids": top.tolist(),
            "top_logits": np.round(np.take_along_axis(scores, top, -1), 4).tolist(),
        })  # fmt: skip
    ref = {
        "llama_cpp_python": llama_cpp.__version__,
        "gguf_file": gguf.name,
        "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
        "metadata": {
            k: meta[k]
            for k in (
                "llama.block_count",
                "llama.embedding_length",
                "llama.context_length",
                "llama.rope.freq_base",
                "tokenizer.chat_template",
            )
        },  # fmt: skip
        "n_vocab": model.n_vocab(),
        "top_k": TOP_K,
        "tokenization": tokens,
        "prompts": prompts,
    }
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(ref, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    tmp.replace(OUT)
    model.close()
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
