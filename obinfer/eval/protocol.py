"""The evaluation's protocol (docs/ruler.md section 1.6): how a RULER sample becomes token ids, and the
length checks that say, before anything runs, whether it fits the model.

A sample is prompted with the library's one prompt builder, :func:`obinfer.prompts.build_prompt`, with
kvpress's settings: no separator between context and question (RULER's questions carry their own
lead-in), the task's answer prefix after the template suffix, and a BOS token without a chat template:

    agnostic: prefill ``prefix + context``            after ``question + suffix + answer_prefix``
    aware:    prefill ``prefix + context + question`` after ``suffix + answer_prefix``
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from obinfer.errors import UserError
from obinfer.eval import EvalError
from obinfer.prompts import Prompt, build_prompt

MODES = ("agnostic", "aware")


def sample_prompt(tok: Any, row: dict[str, Any], mode: str, chat: bool) -> Prompt:
    """Token ids of one sample: ``.prefill`` (compressed by a press) and ``.after`` (fed after it).

    Args:
        tok: a tokenizer (encode(text, add_bos=), chat_parts(), has_chat_template, bos_id).
        row: a sample (context, question, answer_prefix; task and index name it in errors).
        mode: "agnostic" (the question follows compression) or "aware" (it is compressed too).
        chat: wrap in the chat template (the template writes any BOS); without, BOS + context and a
            ``"\\n"`` suffix.
    Raises:
        EvalError: either part is empty after tokenization.
    """
    try:
        p = build_prompt(
            tok,
            row["context"],
            row["question"],
            chat=chat,
            query_aware=mode == "aware",
            sep="",
            answer_prefix=row["answer_prefix"],
            bos=True,
        )
    except UserError:
        p = None
    if p is None or not p.prefill or not p.after:
        raise EvalError(f"{row['task']} #{row['index']}: empty context or question after tokenization")
    return p


def count_tokens_fn(tok: Any) -> Callable[[str], int]:
    """RULER's length measure: tokens of the raw text, without BOS or chat template."""
    return lambda text: len(tok.encode(text, add_bos=False))


def check_fits(row: dict[str, Any], prompt: Prompt, max_new: int, limit: int) -> None:
    """Raise EvalError if the sample's prompt plus `max_new` answer tokens exceed the model's `limit`."""
    if len(prompt) + max_new > limit:
        raise EvalError(
            f"{row['task']} #{row['index']}: {len(prompt)} prompt tokens + {max_new} new tokens exceed the "
            f"model's {limit} positions (use a smaller --length or --max-new-tokens)"
        )


def answer_cap(task_new_tokens: int, max_new_tokens: int | None = None) -> int:
    """The most answer tokens of a sample: its task's own budget, or `max_new_tokens` where smaller."""
    return min(task_new_tokens, max_new_tokens or task_new_tokens)


def check_length(
    task: str,
    length: int,
    task_new_tokens: int,
    limit: int | None = None,
    max_new_tokens: int | None = None,
) -> None:
    """Raise EvalError if `length` (RULER's max_seq_length) is out of range for the task or the model.

    A sample's prompt gets ``length - task_new_tokens`` tokens and its answer up to ``task_new_tokens``
    (capped by `max_new_tokens`), so `length` must exceed ``task_new_tokens`` and, given the model's
    `limit` positions, the prompt plus the capped answer must fit them (the chat template's few extra
    tokens are checked per sample by :func:`check_fits`, when its prompt is built).
    """
    if length <= task_new_tokens:
        raise EvalError(
            f"length {length} is too small for {task}: it must exceed the task's {task_new_tokens} answer tokens"
        )
    new = answer_cap(task_new_tokens, max_new_tokens)
    need = length - task_new_tokens + new
    if limit is not None and need > limit:
        raise EvalError(
            f"length {length} does not fit the model: {task} prompts get {length - task_new_tokens} tokens and "
            f"answers {new}, {need} positions in all, but the model has {limit} (use a smaller --length "
            "or --max-new-tokens)"
        )
