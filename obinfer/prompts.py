"""The one prompt builder: which tokens are prefilled (and compressed), which are fed after compression.

``generate``, ``inspect`` and ``eval`` all call :func:`build_prompt`. The protocol is kvpress's:

    plain prompt (no question):  prefill = prefix + text + suffix           after = (nothing)
    query-agnostic (default):    prefill = prefix + context                 after = sep + question + suffix + answer_prefix
    query-aware:                 prefill = prefix + context + sep + question after = suffix + answer_prefix

With a chat template, ``(prefix, suffix)`` are the template's text around one user message
(``Tokenizer.chat_parts``: e.g. ``<|im_start|>user\\n`` and ``<|im_end|>\\n<|im_start|>assistant\\n``) and
the template writes any BOS itself, so none is added. Without one, the suffix is ``"\\n"`` and the BOS
follows ``bos``: ``None`` = the tokenizer's own setting (``add_bos_token``), ``True`` = always
prepend the BOS token when the tokenizer has one (the evaluation's choice, as kvpress's pipeline).

The one named protocol difference is ``sep``: ``generate`` and ``inspect`` put ``"\\n\\n"`` between a
document and a question typed by a user; the RULER tasks' questions carry their own lead-in, so the
evaluation passes ``sep=""``. Positions of the ``after`` part continue from the *uncompressed* prefill
length (``KVCache.seen``), so compression never shifts the question's positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from obinfer.errors import UserError

NO_CHAT_SUFFIX = "\n"  # what follows the question when there is no chat template (kvpress)


@dataclass(frozen=True)
class Prompt:
    """Token ids of one prompt: ``prefill`` (compressed by a press) then ``after`` (fed after it)."""

    prefill: list[int]
    after: list[int]

    def __len__(self) -> int:
        return len(self.prefill) + len(self.after)


def build_prompt(
    tok: Any,
    text: str,
    question: str | None = None,
    *,
    chat: bool | None = None,
    query_aware: bool = False,
    sep: str = "\n\n",
    answer_prefix: str = "",
    bos: bool | None = None,
) -> Prompt:
    """Token ids for a prompt, or for a document (``text``) and a question about it.

    Args:
        tok: an ``obinfer.tokenizer.Tokenizer``.
        text: the prompt, or the document when ``question`` is given.
        question: asked about ``text``; None for a plain prompt (everything is prefilled).
        chat: wrap in the chat template (None: when the tokenizer has one).
        query_aware: compress the question together with the document.
        sep: between the document and the question (nothing when the question is empty).
        answer_prefix: text the answer starts with (RULER's "The special magic number is").
        bos: without a chat template: None = the tokenizer's setting, True = always, False = never.

    Raises:
        UserError: the prompt (or its prefilled part) is empty.
    """
    chat = tok.has_chat_template if chat is None else chat
    prefix, suffix = tok.chat_parts() if chat else ("", NO_CHAT_SUFFIX)
    add_bos = False if chat else bos

    def enc(s: str, first: bool) -> list[int]:
        if not first:
            return tok.encode(s, add_bos=False) if s else []
        if add_bos is True and getattr(tok, "bos_id", None) is not None:
            return [tok.bos_id, *tok.encode(s, add_bos=False)]
        return tok.encode(s, add_bos=add_bos)

    if question is None:
        ids = enc(prefix + text + (suffix if chat else ""), True)
        if not ids:
            raise UserError("the prompt is empty (0 tokens)")
        return Prompt(ids, [])
    gap = sep if question else ""
    if query_aware:
        first, rest = prefix + text + gap + question, suffix + answer_prefix
    else:
        first, rest = prefix + text, gap + question + suffix + answer_prefix
    pre = enc(first, True)
    if not pre:
        raise UserError("the document is empty (0 tokens)")
    return Prompt(pre, enc(rest, False))
