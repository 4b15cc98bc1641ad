"""obinfer: a from-scratch PyTorch inference engine with an inspectable, per-head KV cache.

Public API::

    from obinfer import load, generate, make_press
    model, tok = load()                                   # the embedded SmolLM2-135M-Instruct
    press = make_press("adakv-snapkv-obk", compression_ratio=0.5)
    ids = tok.encode(tok.apply_chat([{"role": "user", "content": "What is the capital of France?"}]))
    print(tok.decode(list(generate(model, ids, press=press, stop_ids=tok.stop_ids))))

Shape glossary (used in every docstring):
    B    batch rows                    T    new tokens in this forward
    S    cache slots of a head         n    tokens scored by a press (slots of a layer's heads)
    Hq   query heads                   Hkv  KV heads
    G    Hq / Hkv (query heads per KV head)
    D    head dim                      C    model (hidden) dim
    V    vocabulary size               W    observation window (queries used for scoring)

Map of the code:
    config.py           ModelConfig (from a Hugging Face config.json)
    models/llama.py     the decoder: RMSNorm, RoPE (llama3 scaling), GQA attention, SwiGLU MLP
    weights.py          safetensors -> model (meta device + assign)
    tokenizer.py        tiktoken BPE / SentencePiece, chat templates, stop tokens, streaming decode
    cache/kv_cache.py   KVCache / LayerCache: per-(row, KV head) segments, ragged heads, positions
    cache/scores.py     saliency scores attn, obv, obk, obkv, caote (pure functions)
    cache/allocators.py uniform and AdaKV budgets
    cache/policies.py   snapkv, tova, h2o, streamingllm, knorm, random
    cache/presses.py    Press = policy + score + allocator; the name grammar [adakv-]policy[-score]
    generate.py         prefill -> compress -> question -> decode; sampling; stats
    gguf_import.py      the embedded default model (GGUF -> safetensors); hub.py downloads
    eval/               offline RULER-style tasks, the one-prefill evaluator, reports
    inspect.py          pictures of what each press keeps
    cli.py              the `obinfer` command
"""

from __future__ import annotations

from obinfer.cache.presses import make_press
from obinfer.generate import GenStats, Sampling, generate, stream
from obinfer.loading import load

__version__ = "0.1.0"


__all__ = ["load", "generate", "stream", "make_press", "Sampling", "GenStats", "__version__"]
