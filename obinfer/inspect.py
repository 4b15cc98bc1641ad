"""`obinfer inspect`: which original positions a press keeps, per layer and KV head, as a picture.

One prefill of the prompt runs *without* compression, with an observer that, at every layer, hands
each press a private copy of that layer's full cache: the press's policy scores it
(`Policy.prefill_scores`, the scores shown) and the press compresses another copy
(`Press.compress_layer`, the kept sets shown). Prefill compression never changes the prompt's own
forward pass (docs/scores.md section 4), so one prefill serves every press compared and the kept sets
are exactly those of a real compressed run.

    >>> views = run_presses(model, ids, [make_press("snapkv", compression_ratio=0.75)])
    >>> views[0].kept[3][1]          # layer 3, KV head 1: sorted original positions kept
    [0, 1, 2, 24, 25, 26, 27, 28, 34]
    >>> tuple(views[0].scores.shape)  # (L, Hkv, n) float32, +inf for protected positions
    (30, 3, 37)

Shapes: L layers, Hkv KV heads, n prompt positions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from obinfer.cache.kv_cache import KVCache, LayerCache
from obinfer.cache.presses import Press
from obinfer.cache.scores import get_score
from obinfer.cli import UserError, add_model_args, add_press_args, build_press, build_prompt, load

SINKS = 4  # the first tokens marked as attention sinks (StreamingLLM's default)
TOKEN_LABELS_MAX = 80  # label the x axis with tokens when the drawn span has at most this many positions
DPI = 150
KEPT, EVICTED, PROTECTED = 1, 0, 2  # raster values of one view
BOTH, ONLY_A, ONLY_B, NEITHER = 3, 1, 2, 0  # raster values of a disagreement panel


class InspectError(UserError, ValueError):
    """Bad input to inspect: an unparsable position list or span, text not found, a missing press."""


@dataclass
class PressView:
    """What one press did to one prompt.

    Attributes:
        name: the press name, e.g. "adakv-snapkv-obk".
        kept: kept[layer][head] -> sorted original positions kept.
        scores: (L, Hkv, n) float32 score of each position before compression; +inf marks positions the
            policy always keeps (its window, the last token, ...), -inf invalid ones.
        window: [start, end) of the observation queries, or None when every query observes (H2O) or no
            query does (knorm, streamingllm, random).
    """

    name: str
    kept: list[list[list[int]]]
    scores: Tensor
    window: tuple[int, int] | None = None

    def raster(self, head: int) -> Tensor:
        """(L, n) int8: EVICTED, KEPT, or PROTECTED (kept because the policy always keeps it)."""
        L, _, n = self.scores.shape
        out = torch.zeros(L, n, dtype=torch.int8)
        for layer in range(L):
            out[layer, self.kept[layer][head]] = KEPT
        return out.masked_fill((self.scores[:, head] == math.inf) & (out == KEPT), PROTECTED)

    def kept_mask(self) -> Tensor:
        """(L, Hkv, n) bool: position kept."""
        L, H, n = self.scores.shape
        return torch.stack([(self.raster(h) != EVICTED) for h in range(H)], dim=1)


@dataclass
class Inspection:
    """One prompt, its tokens, and the views of the presses run on it."""

    tokens: list[str]
    views: list[PressView]
    highlight: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.tokens)


# ----------------------------------------------------------------------------- running presses
def observation_window(press: Press, n: int) -> tuple[int, int] | None:
    """[start, end) of the queries whose attention scores the keys (see PressView.window)."""
    pol = press.policy
    if pol.name == "snapkv":
        return (max(0, n - pol.window), n)
    if pol.name == "tova":
        return (n - 1, n)
    return None


def copy_layer(layer: LayerCache) -> LayerCache:
    """A deep copy of one layer's cache (via `KVCache.fork`)."""
    return KVCache([layer], layer.batch, layer.k.device).fork().layers[0]


def _scores_by_position(press: Press, q: Tensor, q_pos: Tensor, layer: LayerCache, n: int) -> Tensor:
    """The policy's scores of a full layer as (Hkv, n), indexed by position (row 0 of the batch)."""
    _, _, pos = layer.dense()
    n_kept = press.n_kept((pos[:, 0] >= 0).sum(-1))
    s = press.policy.prefill_scores(q, q_pos, layer, get_score(press.score), press.gqa, n_kept)[0]
    out = torch.full((s.shape[0], n), -math.inf)
    valid = pos[0] >= 0
    for h in range(s.shape[0]):
        out[h, pos[0, h][valid[h]].cpu()] = s[h][valid[h]].float().cpu()
    return out


@torch.inference_mode()
def run_presses(model: Any, ids: Sequence[int], presses: Sequence[Press]) -> list[PressView]:
    """One uncompressed prefill of `ids`; each press scores and compresses its own copy of every layer.

    Args:
        model: a `Transformer`.
        ids: the prompt's token ids (one row).
        presses: the presses to compare (not None).
    Returns:
        One PressView per press, in order.
    """
    if not presses:
        raise InspectError("inspect needs at least one press")
    L, n = model.cfg.n_layers, len(ids)
    scores = [torch.empty(L, model.cfg.n_kv_heads, n) for _ in presses]
    kept: list[list[Any]] = [[None] * L for _ in presses]
    for press in presses:
        press.prefill_observer()  # resets the press's per-prompt counters

    def observe(i: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
        for j, press in enumerate(presses):
            scores[j][i] = _scores_by_position(press, q, q_pos, copy_layer(layer), n)
            work = copy_layer(layer)
            press.compress_layer(i, q, q_pos, work)
            kept[j][i] = KVCache([work], 1, work.k.device).kept_positions()[0][0]

    x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    model(x, model.new_cache(1), observer=observe, last_only=True)
    return [PressView(p.name, kept[j], scores[j], observation_window(p, n)) for j, p in enumerate(presses)]


def agreement(a: PressView, b: PressView) -> float:
    """Jaccard overlap of two views' kept (layer, head, position) sets, in [0, 1]."""
    ma, mb = a.kept_mask(), b.kept_mask()
    union = int((ma | mb).sum())
    return int((ma & mb).sum()) / union if union else 1.0


# ----------------------------------------------------------------------------- positions
def parse_positions(spec: str, n: int) -> list[int]:
    """Positions from "120,130-140" (ranges inclusive), each in [0, n). Returns them sorted, unique."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise InspectError(f"--highlight: cannot read {part!r} (expected N or N-M)") from None
        if a > b or a < 0 or b >= n:
            raise InspectError(
                f"--highlight: {part!r} is not a range inside the prompt's positions 0-{n - 1}"
            )
        out.update(range(a, b + 1))
    return sorted(out)


def parse_span(spec: str, n: int) -> tuple[int, int]:
    """[start, end) from "A:B" (Python slice style, either side may be empty)."""
    lo, sep, hi = spec.partition(":")
    try:
        a = int(lo) if lo.strip() else 0
        b = int(hi) if hi.strip() else n
    except ValueError:
        raise InspectError(f"--span: cannot read {spec!r} (expected START:END)") from None
    if not sep or not 0 <= a < b <= n:
        raise InspectError(f"--span {spec!r} must be START:END with 0 <= START < END <= {n}")
    return a, b


def find_text(pieces: Sequence[str], text: str) -> list[int]:
    """Positions of the tokens covering every occurrence of `text` in the concatenated pieces."""
    if not text:
        raise InspectError("--highlight-text is empty")
    joined, starts, c = "".join(pieces), [], 0
    for p in pieces:
        starts.append(c)
        c += len(p)
    found: set[int] = set()
    at = joined.find(text)
    while at >= 0:
        end = at + len(text)
        found.update(i for i, s in enumerate(starts) if s < end and s + len(pieces[i]) > at)
        at = joined.find(text, at + 1)
    if not found:
        raise InspectError(f"--highlight-text {text!r} does not occur in the prompt")
    return sorted(found)


# ----------------------------------------------------------------------------- JSON
def _finite(x: float) -> float | None:
    return float(f"{x:.6g}") if math.isfinite(x) else None  # 6 significant digits


def to_json(insp: Inspection, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready dict: tokens, highlight, and per press kept[layer][head], scores[layer][head][pos]
    (null for non-finite scores) and protected[layer][head] (positions scored +inf)."""
    presses = []
    for v in insp.views:
        s = v.scores
        presses.append(
            {
                "name": v.name,
                "observation_window": list(v.window) if v.window else None,
                "kept": v.kept,
                "protected": [
                    [torch.nonzero(s[i, h] == math.inf)[:, 0].tolist() for h in range(s.shape[1])]
                    for i in range(s.shape[0])
                ],
                "scores": [[[_finite(x) for x in row.tolist()] for row in layer] for layer in s],
            }
        )
    out = dict(meta or {})
    out.update(n_positions=insp.n, tokens=insp.tokens, highlight=insp.highlight, presses=presses)
    if len(insp.views) == 2:
        out["agreement"] = agreement(*insp.views)
    return out


# ----------------------------------------------------------------------------- picture
_VIEW_COLORS = ("#f4f4f4", "#1f3b73", "#8fa8d6")  # evicted, kept, protected
_DIFF_COLORS = ("#f4f4f4", "#d62728", "#1f77b4", "#b8b8b8")  # neither, only A, only B, both
_MARKS = (("sinks", "#2ca02c"), ("observation window", "#9467bd"), ("highlight", "#e6ab02"))


def _token_label(piece: str) -> str:
    return piece.replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u00b7") or "\u2205"


def _marks(insp: Inspection, view: PressView | None) -> list[tuple[str, str, list[int]]]:
    sinks = list(range(min(SINKS, insp.n)))
    window = list(range(*view.window)) if view is not None and view.window else []
    return [
        (name, color, pos) for (name, color), pos in zip(_MARKS, (sinks, window, insp.highlight), strict=True)
    ]


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted positions -> inclusive runs [(a, b), ...]."""
    runs: list[tuple[int, int]] = []
    for p in sorted(positions):
        if runs and p == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    return runs


def _draw_marks(ax: Any, marks: list[tuple[str, str, list[int]]], span: tuple[int, int]) -> None:
    """Coloured strips just above the panel (one level per kind, 3 points apart) and highlight edges."""
    from matplotlib.transforms import ScaledTranslation

    a, b = span
    for level, (name, color, positions) in enumerate(marks):
        up = ScaledTranslation(0, (2.5 + 3.5 * level) / 72, ax.figure.dpi_scale_trans)
        for lo, hi in _runs([p for p in positions if a <= p < b]):
            ax.plot(
                [lo - 0.5, hi + 0.5],
                [1, 1],
                transform=ax.get_xaxis_transform() + up,
                color=color,
                lw=2.8,
                solid_capstyle="butt",
                clip_on=False,
            )
            if name == "highlight":
                for x in (lo - 0.5, hi + 0.5):
                    ax.axvline(x, color=color, lw=0.6, alpha=0.7)


def _style_axis(ax: Any, insp: Inspection, span: tuple[int, int], n_layers: int, bottom: bool) -> None:
    a, b = span
    ax.set_xlim(a - 0.5, b - 0.5)
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 6)))
    ax.tick_params(labelsize=6)
    if b - a <= TOKEN_LABELS_MAX:
        ax.set_xticks(range(a, b))
        ax.set_xticklabels(
            [_token_label(t) for t in insp.tokens[a:b]] if bottom else [],
            rotation=90,
            fontsize=6 if b - a <= 50 else 5,
        )
    elif bottom:
        ax.set_xlabel("position", fontsize=7)


def plot_inspection(
    insp: Inspection,
    out: str | Path,
    span: tuple[int, int] | None = None,
    title: str | None = None,
    dpi: int = DPI,
) -> Path:
    """Write a PNG: rows = KV heads, columns = presses (+ their disagreement when there are two).

    Each panel is a layer x position raster of one KV head: dark = kept, light blue = kept because the
    policy always keeps it (window, last token), pale = evicted. Strips above each panel mark the sink
    tokens, the observation window and the highlighted positions. Panel titles give the share of the
    drawn (layer, position) cells kept (or, for the disagreement panel, kept by exactly one press).
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    views, span = insp.views, span or (0, insp.n)
    L, H, _ = views[0].scores.shape
    diff = len(views) == 2
    cols, width = len(views) + diff, span[1] - span[0]
    col_w = min(7.0, max(3.5, 0.11 * width)) if width <= TOKEN_LABELS_MAX else 6.0
    row_h = 0.7 + 0.05 * L + (0.5 if width <= TOKEN_LABELS_MAX else 0.0)
    fig = Figure(figsize=(col_w * cols + 0.6, row_h * H + 1.1), dpi=dpi, layout="constrained")
    axes = fig.subplots(H, cols, squeeze=False, sharex=True, sharey=True)
    extent = (span[0] - 0.5, span[1] - 0.5, L - 0.5, -0.5)
    for h in range(H):
        rasters = [v.raster(h)[:, span[0] : span[1]] for v in views]
        for c, (v, r) in enumerate(zip(views, rasters, strict=True)):
            _panel(axes[h][c], r, ListedColormap(_VIEW_COLORS), 2, extent, v.name, h, r != EVICTED)
            _draw_marks(axes[h][c], _marks(insp, v), span)
        if diff:
            ka, kb = (r != EVICTED for r in rasters)
            d = ka.to(torch.int8) * ONLY_A + kb.to(torch.int8) * ONLY_B
            label = f"{views[0].name} vs {views[1].name}"
            _panel(axes[h][-1], d, ListedColormap(_DIFF_COLORS), 3, extent, label, h, ka != kb, "differ")
            _draw_marks(axes[h][-1], _marks(insp, None), span)
        for c in range(cols):
            _style_axis(axes[h][c], insp, span, L, bottom=h == H - 1)
        axes[h][0].set_ylabel("layer", fontsize=7)
    handles = [
        Patch(color=_VIEW_COLORS[i], label=t) for i, t in ((1, "kept"), (2, "always kept"), (0, "evicted"))
    ]
    handles += [Patch(color=c, label=n) for n, c in _MARKS]
    if diff:
        handles += [Patch(color=_DIFF_COLORS[i], label=f"only {views[i - 1].name}") for i in (1, 2)]
    fig.legend(
        handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize=7, frameon=False
    )
    fig.suptitle(title or f"kept positions per layer and KV head ({insp.n} tokens)", fontsize=9)
    out = Path(out)
    fig.savefig(out, dpi=dpi)
    return out


def _panel(
    ax: Any,
    r: Tensor,
    cmap: Any,
    vmax: int,
    extent: Any,
    name: str,
    h: int,
    count: Tensor,
    what: str = "kept",
) -> None:
    ax.imshow(r.numpy(), cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest", extent=extent)
    share = int(count.sum()) / max(1, count.numel())
    ax.set_title(f"{name}  |  KV head {h}  |  {what} {share:.0%}", fontsize=7, pad=13, loc="left")


# ----------------------------------------------------------------------------- command line
def add_commands(subparsers: Any) -> None:
    """Register `obinfer inspect` (picked up by obinfer.cli)."""
    p = subparsers.add_parser(
        "inspect",
        help="draw which positions a press keeps in every layer and KV head (PNG) or dump them (JSON)",
        description="Prefill a document once, compress it with one press (or two with --compare) and "
        "draw, for every layer and KV head, which original positions were kept.",
    )
    add_model_args(p)
    add_press_args(p)
    p.add_argument("--context-file", required=True, help="the document to prefill and compress")
    p.add_argument("--question", help="appended to the document before compression (query-aware)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the document in the chat template (default: on when the model has one)",
    )
    p.add_argument("--compare", metavar="A,B", help="two presses side by side and their disagreement")
    p.add_argument("--out", help="PNG file to write")
    p.add_argument(
        "--json",
        dest="json_out",
        metavar="PATH",
        help="write kept positions and scores as JSON ('-' = stdout)",
    )
    p.add_argument("--highlight", help="positions to mark, e.g. 120,130-140 (ranges inclusive)")
    p.add_argument("--highlight-text", help="mark the tokens of every occurrence of this text")
    p.add_argument("--span", help="draw only positions START:END (tokens become tick labels when short)")
    p.add_argument("--title", help="figure title")
    p.add_argument("--dpi", type=int, default=DPI, help=f"PNG resolution (default {DPI})")
    p.set_defaults(func=cmd_inspect)


def _presses(args: argparse.Namespace) -> list[Press]:
    if args.compare:
        if args.press not in ("full", "none"):
            raise InspectError("give --press or --compare, not both")
        names = [s.strip() for s in args.compare.split(",") if s.strip()]
        if len(names) != 2:
            raise InspectError(f"--compare takes two press names separated by a comma, got {args.compare!r}")
    else:
        names = [args.press]
    presses = [build_press(argparse.Namespace(**{**vars(args), "press": name})) for name in names]
    if any(p is None for p in presses):
        raise InspectError("inspect needs a press (e.g. --press snapkv-obk --compression-ratio 0.75)")
    return presses


def cmd_inspect(args: argparse.Namespace) -> None:
    from obinfer.cli import read_text

    if not args.out and not args.json_out:
        raise InspectError("give --out FILE.png and/or --json FILE")
    presses = _presses(args)
    context = read_text(args.context_file)
    model, tok, model_dir = load(args.model, args.dtype, args.device, args.weights_dir)
    chat = tok.has_chat_template if args.chat is None else args.chat
    ids, _ = build_prompt(tok, "", context, args.question, chat, query_aware=args.question is not None)
    if len(ids) >= model.cfg.max_position_embeddings:
        raise InspectError(
            f"prompt has {len(ids)} tokens but the model's context is {model.cfg.max_position_embeddings}"
        )
    pieces = [tok.decode([i]) for i in ids]
    highlight = set(parse_positions(args.highlight, len(ids))) if args.highlight else set()
    if args.highlight_text:
        highlight.update(find_text(pieces, args.highlight_text))
    span = parse_span(args.span, len(ids)) if args.span else None
    insp = Inspection(pieces, run_presses(model, ids, presses), sorted(highlight))
    _print_summary(insp)
    if args.out:
        print(f"wrote {plot_inspection(insp, args.out, span, args.title, args.dpi)}", file=sys.stderr)
    if args.json_out:
        meta = {
            "model": str(model_dir),
            "question": args.question,
            "compression_ratio": args.compression_ratio,
            "cache_budget": args.cache_budget,
        }
        text = json.dumps(to_json(insp, meta))
        if args.json_out == "-":
            print(text)
        else:
            Path(args.json_out).write_text(text + "\n", encoding="utf-8")
            print(f"wrote {args.json_out}", file=sys.stderr)


def _print_summary(insp: Inspection) -> None:
    """One line per press on stderr: share of (layer, head, position) slots kept, and of the highlight."""
    for v in insp.views:
        m = v.kept_mask()
        line = f"{v.name}: {int(m.sum())} of {m.numel()} (layer, head, position) slots kept ({m.float().mean():.1%})"
        if insp.highlight:
            line += f"; highlighted tokens kept in {m[..., insp.highlight].float().mean():.1%} of their slots"
        print(line, file=sys.stderr)
    if len(insp.views) == 2:
        print(f"agreement (Jaccard of kept slots): {agreement(*insp.views):.1%}", file=sys.stderr)
