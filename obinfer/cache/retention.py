"""TRIM-KV (Bui et al., "Cache What Lasts", arXiv 2512.03324): learned retention gates and the `trimkv`
policy that evicts by them.

A small gate per layer reads a token's normalised hidden state at that layer (the attention's input) the
moment the token arrives and predicts one retention beta in (0, 1) per KV head:

    beta = sigmoid(W2 silu(W1 x + b1) + b2)          (W1: width x C, W2: Hkv x width)

At step t (the position of the next query) token i holds the decayed retention beta_i^(t - i), i.e. the
ranking score (t - i) log beta_i: tokens with beta near 1 decay slowly and stay. When a head holds more
than its budget M, the tokens of lowest current retention go, at prefill (one shot, or block by block
with `--prefill-chunk`) and after every decoding step; every head keeps its own tokens. The model is
frozen; only the gates are trained (`obinfer/training.py`, `obinfer train-gates`), so the retention
is per model and per budget.

Gates files are safetensors (`w1` (L, width, C), `b1` (L, width), `w2` (L, Hkv, width), `b2` (L, Hkv),
float32) whose metadata names the format, the model's weights digest (`weights_digest`), the budget and
the training settings. A file made for another model, shape or budget is refused (`GatesError`). Trained
gates ship in `obinfer/data/gates/`; `--press trimkv --cache-budget M` finds the ones for the loaded model
and M there, `--press-opt gates=FILE` names a file.

Spec: docs/scores.md section 3 (TRIM-KV).
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from obinfer.cache.kv_cache import LayerCache
from obinfer.cache.policies import INF, Policy, PressError, _invalid, _show, register_policy
from obinfer.errors import ObinferError
from obinfer.weights import weights_digest

GATES_FORMAT = "obinfer-trimkv-gates/1"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "gates"
ACC_PREFIX = "retention:"


class GatesError(ObinferError, ValueError):
    """A gates file that cannot serve this model or budget: missing, malformed, or made for another."""


class RetentionGates(nn.Module):
    """One gate per layer, all layers' weights stacked: x (B, T, C) at layer idx -> log beta (B, Hkv, T).

    Initialised with W2 = 0 and b2 = `init_bias`, so every token starts with the same beta = sigmoid(b2)
    (close to 1: almost no decay, the frozen model's attention nearly unchanged) and training tells
    tokens apart.
    """

    def __init__(
        self, n_layers: int, hidden_size: int, n_kv_heads: int, width: int = 32, init_bias: float = 8.0
    ) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_layers, width, hidden_size) / hidden_size**0.5)
        self.b1 = nn.Parameter(torch.zeros(n_layers, width))
        self.w2 = nn.Parameter(torch.zeros(n_layers, n_kv_heads, width))
        self.b2 = nn.Parameter(torch.full((n_layers, n_kv_heads), float(init_bias)))
        self.meta: dict[str, str] = {}

    @classmethod
    def for_model(cls, model: Any, width: int = 32, init_bias: float = 8.0) -> RetentionGates:
        cfg = model.cfg
        return cls(cfg.n_layers, cfg.hidden_size, cfg.n_kv_heads, width, init_bias).to(model.device)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(layers, width, hidden size, KV heads)."""
        L, W, C = self.w1.shape
        return L, W, C, self.w2.shape[1]

    def log_beta(self, idx: int, x: Tensor) -> Tensor:
        """log beta (B, Hkv, T), float32 (<= 0), of the tokens whose layer-idx attention input is x (B, T, C)."""
        h = F.silu(F.linear(x.float(), self.w1[idx], self.b1[idx]))
        return F.logsigmoid(F.linear(h, self.w2[idx], self.b2[idx])).transpose(1, 2)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, meta: dict[str, Any]) -> Path:
        """Write the gates (float32) and metadata (values as strings) atomically to path."""
        from safetensors.torch import save_file

        from obinfer.storage import atomic_path

        tensors = {n: p.detach().float().cpu().contiguous() for n, p in self.named_parameters()}
        md = {"format": GATES_FORMAT, **{k: str(v) for k, v in meta.items()}}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=md)
        self.meta = md
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> RetentionGates:
        """Read a gates file (GatesError naming the file when it is missing or malformed)."""
        path = Path(path)
        if not path.is_file():
            raise GatesError(f"gates file not found: {path}")
        meta = read_meta(path)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise GatesError(f"{path} is not a readable gates file: {e}") from None
        names = {"w1", "b1", "w2", "b2"}
        if set(t) != names:
            raise GatesError(f"{path} holds tensors {sorted(t)}, a gates file holds {sorted(names)}")
        L, W, C = t["w1"].shape if t["w1"].dim() == 3 else (0, 0, 0)
        H = t["w2"].shape[1] if t["w2"].dim() == 3 else 0
        want = {"w1": (L, W, C), "b1": (L, W), "w2": (L, H, W), "b2": (L, H)}
        if not L or any(tuple(t[n].shape) != s for n, s in want.items()):
            raise GatesError(
                f"{path}: inconsistent gate shapes { ({n: tuple(v.shape) for n, v in t.items()}) }"
            )
        if not all(torch.isfinite(v).all() for v in t.values()):
            raise GatesError(f"{path}: the gate weights hold NaN or infinite values")
        g = cls(L, C, H, W)
        with torch.no_grad():
            for n, p in g.named_parameters():
                p.copy_(t[n].float())
        g.meta = meta
        return g

    def check(self, model: Any, budget: int | None, source: str = "the gates") -> None:
        """GatesError unless these gates were made for this model (shape and weights digest) and, when a
        budget is given, for that budget."""
        cfg = model.cfg
        L, _, C, H = self.shape
        if (L, C, H) != (cfg.n_layers, cfg.hidden_size, cfg.n_kv_heads):
            raise GatesError(
                f"{source} are for a model of {L} layers, width {C}, {H} KV heads; this one has "
                f"{cfg.n_layers}, {cfg.hidden_size}, {cfg.n_kv_heads}"
            )
        digest = self.meta.get("weights_digest")
        if digest != weights_digest(model):
            made = self.meta.get("model", "another model")
            raise GatesError(
                f"{source} were trained for {made} (weights digest {str(digest)[:12]}), not this model"
            )
        trained = self.meta.get("budget")
        if budget is not None and trained != str(budget):
            raise GatesError(
                f"{source} were trained for a cache budget of {trained} tokens per head, not {budget}: "
                f"train gates for {budget} (obinfer train-gates --budget {budget}) or use --cache-budget {trained}"
            )


def read_meta(path: Path) -> dict[str, str]:
    """The metadata of a safetensors gates file, from its header alone (GatesError if it is not one)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 1 << 24:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise GatesError(f"{path} is not a gates file (unreadable safetensors header: {e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != GATES_FORMAT:
        raise GatesError(f"{path} is not an obinfer TRIM-KV gates file (format {GATES_FORMAT} expected)")
    return meta


def shipped_gates() -> list[tuple[Path, dict[str, str]]]:
    """The gates files shipped with obinfer (obinfer/data/gates/*.safetensors) and their metadata."""
    out = []
    for p in sorted(SHIPPED_DIR.glob("*.safetensors")) if SHIPPED_DIR.is_dir() else []:
        try:
            out.append((p, read_meta(p)))
        except GatesError:
            continue
    return out


def find_gates(model: Any, budget: int | None) -> Path:
    """The shipped gates file for this model and budget (GatesError saying how to make one)."""
    digest = weights_digest(model)
    mine = [(p, m) for p, m in shipped_gates() if m.get("weights_digest") == digest]
    for p, m in mine:
        if budget is not None and m.get("budget") == str(budget):
            return p
    have = ", ".join(sorted(m.get("budget", "?") for _, m in mine)) or "none"
    if budget is None:
        raise GatesError(
            "trimkv needs an absolute budget to find its gates: give --cache-budget M (shipped for this "
            f"model: {have}) or --press-opt gates=FILE"
        )
    raise GatesError(
        f"no trained TRIM-KV gates ship for this model at a budget of {budget} (shipped budgets: {have}); "
        f"make them with `obinfer train-gates --budget {budget} --out gates.safetensors` and pass "
        "--press-opt gates=gates.safetensors"
    )


def _lookup(model: Any, budget: int | None) -> Path:
    return find_gates(model, budget)  # a module-level name, so a test can stand in for the shipped files


_LOADED: dict[tuple[str, float, str], RetentionGates] = {}


def load_gates(path: Path, device: torch.device | str = "cpu") -> RetentionGates:
    """`RetentionGates.load`, kept per (file, modification time, device): the runs of a file share a copy."""
    key = (str(path.resolve()), path.stat().st_mtime if path.exists() else 0.0, str(device))
    if key not in _LOADED:
        _LOADED[key] = RetentionGates.load(path).to(device)
    return _LOADED[key]


_BOUND: dict[tuple[str, str], RetentionGates] = {}  # (bound gates file, device) -> gates, refreshed by bind


@register_policy
class TrimKV(Policy):
    """TRIM-KV: learned per-head retention gates; keeps the tokens of highest decayed retention beta^(t-i).

    Option: `gates` (a gates file; "" = the shipped gates for the loaded model and the press's budget).
    Needs the model (its hidden states); evicts at prefill and, under an absolute budget, while decoding.
    """

    name = "trimkv"
    uses_score = False
    decode_time = True
    needs_input = True
    gates: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.gates, str):
            raise PressError(f"trimkv option gates must be a file path (a string), got {_show(self.gates)}")

    @property
    def acc_name(self) -> str:
        """The per-slot accumulator holding each token's log beta (one per gates file)."""
        return ACC_PREFIX + self.gates

    def input_accumulators(self) -> tuple[str, ...]:
        return (self.acc_name,)

    def bind(self, model: Any, budget: int | None) -> TrimKV:
        """This policy naming its gates file (found for the model and budget when `gates` is ""), checked
        against the model (and the budget, when given)."""
        path = Path(self.gates).expanduser() if self.gates else _lookup(model, budget)
        load_gates(path).check(model, budget, source=f"the gates in {path}")
        bound = replace(self, gates=str(path.resolve()))
        for key in [k for k in _BOUND if k[0] == bound.gates]:  # a rebind sees a rewritten file
            del _BOUND[key]
        return bound

    def observe_input(self, idx: int, x: Tensor, pos: Tensor, layer: LayerCache) -> None:
        key = (self.gates, str(x.device))  # called per layer per step: a dict lookup, no file stat
        gates = _BOUND.get(key)
        if gates is None:
            gates = _BOUND[key] = load_gates(Path(self.gates), x.device)
        with torch.no_grad():
            layer.set_newest(self.acc_name, gates.log_beta(idx, x))

    def score(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        return self._retention(layer, q_pos[:, -1] + 1)

    def decode_scores(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        return self._retention(layer, q_pos[:, -1] + 1)

    def _retention(self, layer: LayerCache, t: Tensor) -> Tensor:
        """(t - i) log beta_i (B, Hkv, S): log of the retention each slot holds when the query at position
        t (B,) attends; -inf on invalid slots."""
        _, _, pos = layer.dense()
        lb = layer.acc_dense(self.acc_name)
        return _invalid(lb * (t[:, None, None] - pos).clamp_min(0).to(lb.dtype), pos)


__all__ = [
    "GATES_FORMAT",
    "INF",
    "GatesError",
    "RetentionGates",
    "TrimKV",
    "find_gates",
    "read_meta",
    "shipped_gates",
    "weights_digest",
]
