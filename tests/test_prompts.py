"""The one prompt builder (obinfer.prompts): plain prompts, query-agnostic and query-aware splits, the
user-facing separator vs the evaluation's, BOS handling with and without a chat template."""

from __future__ import annotations

import pytest

from obinfer.errors import UserError
from obinfer.prompts import build_prompt
from obinfer.tokenizer import load_tokenizer

DOC, Q = "The code is 4821. The sky is blue.", "What is the code?"


@pytest.fixture(scope="module")
def tok(tiny_chat_dir):
    return load_tokenizer(tiny_chat_dir)


def test_plain_chat_prompt_is_the_chat_template(tok):
    p = build_prompt(tok, Q)
    assert p.after == [] and p.prefill == tok.encode_chat([{"role": "user", "content": Q}])


def test_agnostic_and_aware_cover_the_same_text_split_differently(tok):
    prefix, suffix = tok.chat_parts()
    ag = build_prompt(tok, DOC, Q)
    aw = build_prompt(tok, DOC, Q, query_aware=True)
    assert ag.prefill == tok.encode(prefix + DOC, add_bos=False)
    assert ag.after == tok.encode("\n\n" + Q + suffix, add_bos=False)
    assert aw.prefill == tok.encode(prefix + DOC + "\n\n" + Q, add_bos=False)
    assert aw.after == tok.encode(suffix, add_bos=False)  # the template's tail is never compressed
    assert (
        tok.decode(ag.prefill + ag.after)
        == tok.decode(aw.prefill + aw.after)
        == prefix + DOC + "\n\n" + Q + suffix
    )


def test_user_protocol_vs_evaluation_protocol(tok):
    """generate/inspect: "\\n\\n" between document and question; eval (RULER): no separator, an answer prefix."""
    user = build_prompt(tok, DOC, Q)
    ruler = build_prompt(tok, DOC, " " + Q, sep="", answer_prefix=" Answer:")
    assert user.prefill == ruler.prefill
    assert tok.decode(user.after).startswith("\n\n" + Q)
    assert tok.decode(ruler.after) == " " + Q + tok.chat_parts()[1] + " Answer:"


def test_bos_without_chat_template(tok):
    bos = tok.bos_id if tok.bos_id is not None else tok.token_id("<|endoftext|>")
    tok_with_bos = type("T", (), {})()  # a tokenizer that has a BOS token but does not add it by default
    tok_with_bos.has_chat_template, tok_with_bos.bos_id = False, bos
    tok_with_bos.encode = lambda s, add_bos=None: ([bos] if add_bos else []) + tok.encode(s, add_bos=False)
    default = build_prompt(tok_with_bos, DOC, Q, chat=False)
    always = build_prompt(tok_with_bos, DOC, Q, chat=False, bos=True)
    assert always.prefill == [bos, *default.prefill] and always.after == default.after
    assert default.after == tok.encode("\n\n" + Q + "\n", add_bos=False)  # no chat: the suffix is "\n"


def test_empty_prompt_is_refused(tok):
    with pytest.raises(UserError, match="empty"):
        build_prompt(tok, "", chat=False)
    with pytest.raises(UserError, match="empty"):
        build_prompt(tok, "", Q, chat=False)
