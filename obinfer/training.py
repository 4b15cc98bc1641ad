"""Training TRIM-KV's retention gates (arXiv 2512.03324) on a frozen model: `obinfer train-gates`.

Only the gates learn (`obinfer/cache/retention.py`). During training the retention modulates the
attention instead of evicting: in layer l, KV head h, the query at position t sees key i with the
logit bias (t - i) log beta_i (the log of the retention beta_i^(t-i) the token holds then), so

    o_t = sum_i softmax_i(q_t . k_i / sqrt(D) + (t - i) log beta_i) v_i,

which is differentiable in the gates and equals the frozen model when every beta is 1. The loss, per
training sequence of T tokens:

    L = KL(p_frozen || p_gated) + w_ntp CE(next token) + w_cap mean_{l,h,t} relu(C_t - M) / M,
    C_t = sum_{i <= t} beta_i^(t - i)      (the expected number of tokens a head retains at step t)

the distillation term keeps the gated model's next-token distribution on the frozen model's, and the
capacity term pushes each head's expected retained tokens down to the budget M. Sequences are cut from
the given texts (the CLI uses the Paul Graham essays the evaluation fetches, the last 9 held out for
the validation loss), visited in a seeded order.

`train_gates` is resumable: every `ckpt_every` steps it writes a checkpoint (gates, Adam state, step,
settings) next to the output file, atomically; a rerun with the same settings resumes from it, and a
finished run removes it after writing the gates file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from obinfer.cache.retention import RetentionGates, weights_digest
from obinfer.errors import ObinferError
from obinfer.models.llama import apply_rope, rope_cos_sin


class TrainingError(ObinferError, ValueError):
    """Settings or data that cannot train gates (a bad option, too little text, a stale checkpoint)."""


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one gates training (all recorded in the gates file's metadata)."""

    budget: int = 128  # M: tokens per KV head the gates are trained to keep
    steps: int = 200
    seq_len: int = 0  # tokens per training sequence; 0: 4 M, at least 256, at most the model's context
    lr: float = 1e-2
    width: int = 32  # hidden units of each layer's gate
    init_bias: float = 8.0  # initial b2: beta = sigmoid(8) = 0.99966
    w_ntp: float = 1.0
    w_cap: float = 1.0
    seed: int = 0
    ckpt_every: int = 25

    def check(self, max_positions: int) -> None:
        for name, lo in (("budget", 1), ("steps", 1), ("width", 1), ("ckpt_every", 1), ("seq_len", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise TrainingError(f"train-gates {name} must be an integer >= {lo}, got {v!r}")
        for name in ("lr", "w_ntp", "w_cap", "init_bias"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or (name != "init_bias" and v < 0):
                raise TrainingError(f"train-gates {name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise TrainingError(f"train-gates lr must be > 0, got {self.lr!r}")
        T = self.sequence_length(max_positions)
        if T <= self.budget:
            raise TrainingError(
                f"training sequences of {T} tokens must be longer than the budget {self.budget} "
                f"(the model has {max_positions} positions)"
            )

    def sequence_length(self, max_positions: int) -> int:
        return self.seq_len or min(max(4 * self.budget, 256), max_positions)


# ------------------------------------------------------------------------------------ the gated model
def gated_forward(
    model: Any, ids: Tensor, gates: RetentionGates | None = None, budget: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """The frozen model on ids (B, T) (no padding, positions 0..T-1) with retention-gated attention.

    Returns logits (B, T, V) float32 and, with gates and a budget, the capacity loss
    mean_{l,h,t} relu(C_t - M) / M (else None). Without gates this is the plain model (a test compares
    it with `Transformer.forward`).
    """
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device)[None].expand(B, T)
    cos, sin = rope_cos_sin(model.inv_freq, pos, torch.float32)
    dist = (pos[0][:, None] - pos[0][None, :]).float()  # (T, T): t - i
    causal = dist >= 0
    x = model.model.embed_tokens(ids).float()
    cap_terms = []
    for idx, block in enumerate(model.model.layers):
        att = block.self_attn
        h = block.input_layernorm(x)
        q = att.q_proj(h).view(B, T, att.n_heads, att.head_dim).transpose(1, 2)
        k = att.k_proj(h).view(B, T, att.n_kv_heads, att.head_dim).transpose(1, 2)
        v = att.v_proj(h).view(B, T, att.n_kv_heads, att.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        G = att.n_heads // att.n_kv_heads
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        if gates is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            lb = gates.log_beta(idx, h)  # (B, Hkv, T)
            bias = lb[:, :, None, :] * dist.clamp_min(0)  # (B, Hkv, T, T): (t - i) log beta_i
            if budget is not None:
                kept = torch.where(causal, bias.exp(), 0.0).sum(-1)  # (B, Hkv, T): C_t
                cap_terms.append(F.relu(kept - budget).mean() / budget)
            mask = bias.masked_fill(~causal, float("-inf")).repeat_interleave(G, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + att.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        x = x + block.mlp(block.post_attention_layernorm(x))
    logits = model.lm_head(model.model.norm(x)).float()
    cap = torch.stack(cap_terms).mean() if cap_terms else None
    return logits, cap


def gates_loss(
    model: Any, gates: RetentionGates, ids: Tensor, cfg: TrainConfig
) -> tuple[Tensor, dict[str, float]]:
    """The training loss on ids (B, T) and its parts (kl, ntp, cap, loss) as floats."""
    with torch.no_grad():
        teacher, _ = gated_forward(model, ids)
    logits, cap = gated_forward(model, ids, gates, cfg.budget)
    logp, logq = F.log_softmax(logits, -1), F.log_softmax(teacher, -1)
    kl = (logq.exp() * (logq - logp)).sum(-1).mean()
    ntp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert cap is not None
    loss = kl + cfg.w_ntp * ntp + cfg.w_cap * cap
    return loss, {k: float(v.detach()) for k, v in (("loss", loss), ("kl", kl), ("ntp", ntp), ("cap", cap))}


# ------------------------------------------------------------------------------------ data
def make_sequences(token_ids: Sequence[int], seq_len: int) -> Tensor:
    """Consecutive, non-overlapping sequences (N, seq_len) of a token stream (the tail is dropped)."""
    n = len(token_ids) // seq_len
    if n == 0:
        raise TrainingError(
            f"the training text has {len(token_ids)} tokens, fewer than one sequence of {seq_len}"
        )
    return torch.tensor(list(token_ids[: n * seq_len]), dtype=torch.long).view(n, seq_len)


# ------------------------------------------------------------------------------------ the loop
ProgressFn = Callable[[int, int, dict[str, float]], None]


def train_gates(
    model: Any,
    train: Tensor,
    cfg: TrainConfig,
    out: str | Path,
    *,
    valid: Tensor | None = None,
    model_name: str = "",
    data_name: str = "",
    progress: ProgressFn | None = None,
    fresh: bool = False,
) -> tuple[RetentionGates, dict[str, Any]]:
    """Train gates on sequences train (N, T) and write them to out (a safetensors gates file).

    Resumes from `<out>.ckpt` when it exists and holds the same settings and data (unless fresh).
    progress(step, steps, losses) is called after every step. Returns the gates and a summary
    (losses before/after on `valid`, seconds, steps resumed from).
    """
    cfg.check(int(model.cfg.max_position_embeddings))
    if getattr(model, "quantization", None) or model.dtype != torch.float32:
        raise TrainingError("train gates on the float32 model (no --quantize, --dtype float32)")
    out = Path(out)
    ckpt = out.with_name(out.name + ".ckpt")
    _check_out(out)  # before any step: a bad --out must not cost a training
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    gates = RetentionGates.for_model(model, cfg.width, cfg.init_bias)
    opt = torch.optim.Adam(gates.parameters(), lr=cfg.lr)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    settings = {**asdict(cfg), "n_train": len(train), "seq_len": int(train.shape[1]),
                "data_digest": _digest(train)}  # fmt: skip
    start, elapsed = 0, 0.0
    if ckpt.exists() and not fresh:
        state = _load_ckpt(ckpt)
        if state.get("settings") != settings:
            raise TrainingError(
                f"{ckpt} is a checkpoint of another training (different settings or data): "
                "rerun with --fresh to start over, or delete it"
            )
        gates.load_state_dict(state["gates"])
        opt.load_state_dict(state["opt"])
        start, elapsed = int(state["step"]), float(state["elapsed_s"])
    before = _valid_loss(model, gates if start == 0 else None, valid, cfg)
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    for step in range(start, cfg.steps):
        ids = train[order[step % len(order)]][None].to(model.device)
        loss, last = gates_loss(model, gates, ids, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1, cfg.steps, last)
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            _save_ckpt(ckpt, gates, opt, step + 1, elapsed + time.perf_counter() - t0, settings)
    elapsed += time.perf_counter() - t0
    after = _valid_loss(model, gates, valid, cfg)
    summary = {"train_s": round(elapsed, 1), "resumed_from": start, "valid_before": before, "valid_after": after,
               "last": last}  # fmt: skip
    meta = {
        "model": model_name or "unnamed",
        "weights_digest": weights_digest(model),
        "budget": cfg.budget,
        "data": data_name,
        "train_s": summary["train_s"],
        "settings": settings,
        "valid_before": before,
        "valid_after": after,
    }
    gates.save(out, {k: (v if isinstance(v, str) else _json(v)) for k, v in meta.items()})
    if ckpt.exists():
        ckpt.unlink()
    return gates, summary


def _check_out(out: Path) -> None:
    """The gates file's directory exists (created, like `mkdir -p`) and `out` is not a directory."""
    if out.is_dir():
        raise TrainingError(f"{out} is a directory; give --out a file name (e.g. gates.safetensors)")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise TrainingError(f"{parent} is a file, not a directory for {out.name}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot create the directory {parent} for {out.name}: {e.strerror}") from None


def _valid_loss(
    model: Any, gates: RetentionGates | None, valid: Tensor | None, cfg: TrainConfig
) -> dict | None:
    """Mean loss parts over the validation sequences (gates None: the initial gates)."""
    if valid is None or len(valid) == 0:
        return None
    g = gates if gates is not None else RetentionGates.for_model(model, cfg.width, cfg.init_bias)
    parts: list[dict[str, float]] = []
    with torch.no_grad():
        for row in valid:
            parts.append(gates_loss(model, g, row[None].to(model.device), cfg)[1])
    return {k: round(sum(p[k] for p in parts) / len(parts), 5) for k in parts[0]}


def _digest(t: Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()[:16]


def _json(v: Any) -> str:
    import json

    return json.dumps(v, sort_keys=True)


def _save_ckpt(
    path: Path, gates: RetentionGates, opt: Any, step: int, elapsed: float, settings: dict
) -> None:
    from obinfer.storage import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"gates": gates.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed_s": elapsed, "settings": settings}, tmp)  # fmt: skip


def _load_ckpt(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets one clear line
        raise TrainingError(
            f"{path} is not a readable training checkpoint ({type(e).__name__}); delete it or use --fresh"
        ) from None
    if not isinstance(state, dict) or not {"gates", "opt", "step", "settings"} <= set(state):
        raise TrainingError(f"{path} is not a gates training checkpoint; delete it or use --fresh")
    return state


__all__ = ["TrainConfig", "TrainingError", "gated_forward", "gates_loss", "make_sequences", "train_gates"]
