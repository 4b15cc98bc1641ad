"""Layer budgets: how the total budget of a press is spread over the layers (docs/scores.md section 3).

A press keeps `m` tokens per KV head (`compression_ratio`: m = int(n (1 - cr)); `budget`: m = the budget).
Today's presses give every layer that same m (`flat`, the default, no prefix in press names). A layer
budget gives layer l its own m_l with the **same total**, sum_l m_l = L m (exactly, in integers), then
the head allocator (uniform or AdaKV) spreads m_l over the heads of layer l as before. So
`pyramid-adakv-snapkv-obk` = PyramidKV's layer split, AdaKV's head split inside each layer, SnapKV's
window, the obk score.

The split, for a row with mean m, reserve r (tokens the policy keeps in every layer whatever the budget,
`Policy.reserved`: SnapKV's window, TOVA's last token) and a profile w_l >= 0 (`LayerBudget.profile`):

    x_l = clip(lambda w_l, floor (m - r), cap - r),   sum_l x_l = L (m - r)   (water-filling on lambda)
    m_l = r + x_l, rounded down, the remainder going to the largest fractional parts (lower layer first)

with cap = the row's valid tokens under a compression ratio (a layer cannot keep more than there is; no
cap under an absolute budget, which is a capacity). A profile that is the same for every layer gives
m_l = m: exactly today's press.

Registered like the other parts of a press (`register_layer_budget`): `flat`, `pyramid` (PyramidKV,
arXiv 2406.02069: an arithmetic sequence from (2 - 1/beta) to 1/beta times the mean, beta = 20) and
`epi` (EpiCache, arXiv 2509.17396: w_l = (1 - s_l)^exponent with s_l the layer's sensitivity,
measured once per model by `measure_sensitivity`; floor 25% of the mean).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from obinfer.cache.policies import POLICIES, PressError, check_int, check_name
from obinfer.errors import ObinferError

DEFAULT_LAYER_BUDGET = "flat"  # written without a prefix in press names


class LayerBudget:
    """Base of registered layer budgets: a profile over the layers, options as dataclass fields.

    `profile(n_layers, model)` returns L weights >= 0 (only their ratios matter); `floor` is the least
    share of the mean a layer gets (a fraction in [0, 1]). `name` is set by `register_layer_budget`.
    """

    name = "layers"
    floor: float = 0.0

    @property
    def is_flat(self) -> bool:
        return False

    def profile(self, n_layers: int, model: Any = None) -> list[float]:
        raise NotImplementedError

    def split(
        self,
        mean: Tensor,
        n_layers: int,
        reserve: Tensor | None = None,
        cap: Tensor | None = None,
        model: Any = None,
    ) -> Tensor:
        """(B, L) long tokens per head of each layer, summing to L * mean per row (see the module doc).

        Args:
            mean: (B,) long, tokens per head the flat press keeps in every layer.
            reserve: (B,) long, kept in every layer on top of the profile (clamped to the mean).
            cap: (B,) long, the most a layer can keep (the valid tokens); None for no cap.
        """
        return split_budget(self.profile(n_layers, model), mean, reserve, cap, self.floor)


LAYER_BUDGETS: dict[str, type[LayerBudget]] = {}


def register_layer_budget(name: str) -> Callable[[type[LayerBudget]], type[LayerBudget]]:
    """Class decorator registering a `LayerBudget` subclass under `name` (made a frozen dataclass if it is
    not one; its fields are the options, checked in `__post_init__`). `<name>-<press>` becomes a press
    name for every press."""
    check_name("layer budget", name)
    if name in LAYER_BUDGETS:
        raise ValueError(f"layer budget {name!r} is already registered")
    others = _other_registries()
    if name in others:
        raise ValueError(f"layer budget {name!r} would shadow the {others[name]} of that name")

    def deco(cls: type[LayerBudget]) -> type[LayerBudget]:
        if not (isinstance(cls, type) and issubclass(cls, LayerBudget)):
            raise TypeError(f"register_layer_budget takes a LayerBudget subclass, got {cls!r}")
        if "__dataclass_fields__" not in cls.__dict__:
            cls = dataclass(frozen=True)(cls)
        cls.name = name
        LAYER_BUDGETS[name] = cls
        return cls

    return deco


def _other_registries() -> dict[str, str]:
    """Names taken by the other parts of a press name (policies, allocators, query sources)."""
    out = {n: "policy" for n in POLICIES}
    for mod, attr, kind in (
        ("obinfer.cache.allocators", "ALLOCATORS", "allocator"),
        ("obinfer.cache.lookahead", "QUERY_SOURCES", "query source"),
    ):
        out.update({n: kind for n in getattr(sys.modules.get(mod), attr, {})})
    return out


def layer_budget_options(name: str) -> list[str]:
    """The options a registered layer budget takes, e.g. ["beta"] for pyramid."""
    return [f.name for f in fields(LAYER_BUDGETS[name]) if f.init]


def make_layer_budget(name: str, **options: Any) -> LayerBudget:
    """The registered layer budget `name` with its options (PressError for an unknown name or option)."""
    if name not in LAYER_BUDGETS:
        raise PressError(f"unknown layer budget {name!r} (choose from {', '.join(LAYER_BUDGETS)})")
    unknown = [k for k in options if k not in layer_budget_options(name)]
    if unknown:
        has = layer_budget_options(name)
        opts = f"its options are: {', '.join(has)}" if has else f"{name} takes no options"
        raise PressError(f"unknown option {', '.join(unknown)} for layer budget {name}; {opts}")
    return LAYER_BUDGETS[name](**options)


# ------------------------------------------------------------------------------------------ the split
def split_budget(
    profile: Sequence[float],
    mean: Tensor,
    reserve: Tensor | None = None,
    cap: Tensor | None = None,
    floor: float = 0.0,
) -> Tensor:
    """Spread L * mean tokens over the L layers in proportion to `profile` (module doc), per row.

    Args:
        profile: L weights >= 0 (all zero: flat).
        mean: (B,) long. reserve, cap: (B,) long or None. floor: least share of the mean, in [0, 1].
    Returns:
        (B, L) long; each row sums to L * mean (less only when the caps cannot hold it).
    """
    L = len(profile)
    w = [float(x) for x in profile]
    if L == 0 or any(not math.isfinite(x) or x < 0 for x in w):
        raise PressError(f"a layer profile must be L >= 1 finite weights >= 0, got {list(profile)}")
    if sum(w) == 0:
        w = [1.0] * L
    out = []
    for b, m in enumerate(mean.tolist()):
        r = 0 if reserve is None else min(int(reserve[b]), m)
        hi = math.inf if cap is None else max(int(cap[b]) - r, 0)
        free = m - r
        lo = max(floor * free, 1.0 if r == 0 and m >= 1 else 0.0)  # a layer keeps at least one token
        x = _water_fill(w, L * free, min(lo, hi), hi)
        base = [min(math.floor(v + 1e-9), hi) for v in x]
        left = min(L * free, L * hi) - sum(base)
        order = sorted(range(L), key=lambda i: (-(x[i] - base[i]), i))
        while left > 0 and any(base[i] < hi for i in order):  # the remainder: largest fractions first
            for i in order:
                if left > 0 and base[i] < hi:
                    base[i] += 1
                    left -= 1
        for i in reversed(order):  # float round-off the other way (never more than a token or so)
            if left < 0 and base[i] > 0:
                base[i] -= 1
                left += 1
        out.append([r + v for v in base])
    return torch.tensor(out, dtype=torch.long, device=mean.device)


def _water_fill(w: list[float], total: float, lo: float, hi: float) -> list[float]:
    """x_l = clip(lambda w_l, lo, hi) with sum x = total, lambda found by bisection (the sum grows with it).

    When every weighted layer is at `hi` and that is still short of the total, the layers of weight 0
    share the rest evenly (up to `hi`).
    """
    f = lambda lam: sum(min(max(lam * x, lo), hi) for x in w)  # noqa: E731
    saturated = sum(hi if x > 0 else lo for x in w)
    if saturated <= total:
        zero = [i for i, x in enumerate(w) if x == 0]
        share = min(lo + (total - saturated) / len(zero), hi) if zero else hi
        return [share if x == 0 else hi for x in w]
    a, b = 0.0, 1.0
    while f(b) < total:
        b *= 2.0
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (mid, b) if f(mid) < total else (a, mid)
    return [min(max(b * x, lo), hi) for x in w]


def _fraction(owner: str, name: str, v: Any) -> None:
    if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(v) or not 0 <= v <= 1:
        raise PressError(f"{owner} option {name} must be a number in [0, 1], got {v!r}")


# ------------------------------------------------------------------------------------------ budgets
@register_layer_budget("flat")
class Flat(LayerBudget):
    """Every layer keeps the same budget (today's presses)."""

    @property
    def is_flat(self) -> bool:
        return True

    def profile(self, n_layers: int, model: Any = None) -> list[float]:
        return [1.0] * n_layers


@register_layer_budget("pyramid")
class Pyramid(LayerBudget):
    """PyramidKV layer budgets: a decreasing arithmetic sequence, (2 - 1/beta) to 1/beta times the mean.

    Option `beta` (>= 1, default 20, the paper's): the last layer keeps 1/beta of the mean above the
    policy's reserve; beta = 1 is flat.
    """

    beta: int = 20

    def __post_init__(self) -> None:
        check_int(self.name, "beta", self.beta, 1)

    def profile(self, n_layers: int, model: Any = None) -> list[float]:
        if n_layers == 1:
            return [1.0]
        top, bottom = 2.0 - 1.0 / self.beta, 1.0 / self.beta
        return [top - (top - bottom) * i / (n_layers - 1) for i in range(n_layers)]


@register_layer_budget("epi")
class Epi(LayerBudget):
    """EpiCache layer budgets: m_l proportional to (1 - s_l)^exponent, s_l the layer's sensitivity.

    Options: `exponent` (alpha in the paper, > 0, default 1), `floor` (least share of the mean, default
    0.25), `sensitivity` (the s_l, one per layer; None: measured once per model with
    `measure_sensitivity`), `block` and `calibration` (block size and tokens of that measurement).
    """

    exponent: float = 1.0
    floor: float = 0.25
    sensitivity: tuple[float, ...] | None = None
    block: int = 128
    calibration: int = 1024

    def __post_init__(self) -> None:
        e = self.exponent
        if not isinstance(e, Real) or isinstance(e, bool) or not math.isfinite(e) or e <= 0:
            raise PressError(f"epi option exponent must be a number > 0, got {e!r}")
        _fraction(self.name, "floor", self.floor)
        check_int(self.name, "block", self.block, 1)
        check_int(self.name, "calibration", self.calibration, 2)
        if self.sensitivity is not None:
            s = self.sensitivity
            if (
                isinstance(s, str)
                or not isinstance(s, Sequence)
                or not all(
                    isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x) and -1 <= x <= 1
                    for x in s
                )
            ):
                raise PressError(
                    f"epi option sensitivity must be numbers in [-1, 1], one per layer; got {s!r}"
                )
            object.__setattr__(self, "sensitivity", tuple(float(x) for x in s))

    def sensitivities(self, n_layers: int, model: Any = None) -> list[float]:
        """s_l: the given profile, or the one measured (once) for `model`."""
        s = self.sensitivity
        if s is None:
            if model is None:
                raise PressError(
                    "epi layer budgets need the model to measure its sensitivity profile: start the press "
                    "with press.start(model=model), or give sensitivity"
                )
            s = measure_sensitivity(model, block=self.block, n_tokens=self.calibration)
        if len(s) != n_layers:
            raise PressError(f"epi sensitivity has {len(s)} values but the model has {n_layers} layers")
        return list(s)

    def profile(self, n_layers: int, model: Any = None) -> list[float]:
        return [max(1.0 - s, 0.0) ** self.exponent for s in self.sensitivities(n_layers, model)]


# ------------------------------------------------------------------------------------------ sensitivity
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def calibration_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    """The fixed calibration sequence: n token ids drawn uniformly from [0, vocab) with `seed`."""
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def measure_sensitivity(
    model: Any, ids: Sequence[int] | None = None, *, block: int = 128, n_tokens: int = 1024
) -> list[float]:
    """Per-layer sensitivity s_l in [-1, 1]: how little a layer's keys change when attention is cut
    into blocks (EpiCache's layer profile).

    The sequence (`ids`, default `calibration_ids`, at most the model's context) is run twice: with full
    causal attention, and block by block, each block of `block` tokens attending only to itself (at its
    true positions). s_l is the mean cosine similarity between the two runs' keys of layer l (after RoPE),
    over the KV heads and the tokens after the first block (the first block sees the same in both). A
    layer whose keys barely change (s_l near 1) is insensitive and gets a small budget. Measured once
    per model: memoised per model object, and stored under `<data dir>/sensitivity/` (`$OBINFER_DATA`,
    default ~/.cache/obinfer) keyed by the config, dtype, a fingerprint of the weights, the sequence and
    the block, so later processes read it back.
    """
    cfg = model.cfg
    if ids is None:
        n = max(2, min(n_tokens, cfg.max_position_embeddings))
        ids = calibration_ids(cfg.vocab_size, n)
    ids = list(ids)
    key = (tuple(ids), block)
    memo = _MEASURED.setdefault(model, {})
    if key in memo:
        return list(memo[key])
    if len(ids) <= block:
        raise PressError(f"sensitivity needs more than one block: {len(ids)} tokens, block {block}")
    path = _profile_path(model, ids, block)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["sensitivity"]
        if len(stored) == cfg.n_layers:
            memo[key] = tuple(float(x) for x in stored)
            return list(memo[key])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not measured yet (or unreadable): measure

    def keys_of(chunk: list[int], offset: int) -> list[Tensor]:
        out: list[Tensor] = [None] * cfg.n_layers  # type: ignore[list-item]

        def grab(idx: int, q: Tensor, q_pos: Tensor, layer: Any) -> None:
            out[idx] = layer.dense()[0][0, :, -len(chunk) :].float().clone()  # (Hkv, T, D)

        cache = model.new_cache(1)
        cache.seen = cache.seen + offset
        model(torch.tensor([chunk], device=model.device), cache, observer=grab, last_only=True)
        return out

    full = keys_of(ids, 0)
    parts = [keys_of(ids[s : s + block], s) for s in range(block, len(ids), block)]
    s_l = []
    for i in range(cfg.n_layers):
        restricted = torch.cat([p[i] for p in parts], dim=1)
        cos = torch.nn.functional.cosine_similarity(full[i][:, block:], restricted, dim=-1)
        s_l.append(float(cos.mean()))
    memo[key] = tuple(s_l)
    try:
        from obinfer.storage import atomic_write_text, ensure_dir

        ensure_dir(path.parent)
        atomic_write_text(path, json.dumps({"sensitivity": s_l, "block": block, "tokens": len(ids)}) + "\n")
    except (OSError, ObinferError):
        pass  # a read-only data dir: measured again next time
    return s_l


def _profile_path(model: Any, ids: Sequence[int], block: int) -> Any:
    """Where the profile of this model, sequence and block is stored (see `measure_sensitivity`)."""
    from obinfer.storage import default_data_dir

    h = hashlib.sha256()
    h.update(repr(sorted(vars(model.cfg).items())).encode())
    h.update(f"{model.dtype}|{block}|".encode())
    h.update(",".join(map(str, ids)).encode())
    with torch.no_grad():  # a fingerprint of the weights: a few values of every tensor, float64
        for name, p in sorted(model.state_dict().items()):
            flat = p.reshape(-1)[:64].double().cpu()
            h.update(f"{name}:{tuple(p.shape)}:".encode() + flat.numpy().tobytes())
    return default_data_dir() / "sensitivity" / f"{h.hexdigest()[:24]}.json"


__all__ = [
    "DEFAULT_LAYER_BUDGET",
    "LAYER_BUDGETS",
    "Epi",
    "Flat",
    "LayerBudget",
    "Pyramid",
    "calibration_ids",
    "layer_budget_options",
    "make_layer_budget",
    "measure_sensitivity",
    "register_layer_budget",
    "split_budget",
]
