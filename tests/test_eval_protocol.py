"""The evaluation's prompts go through the library's one prompt builder (obinfer.prompts.build_prompt) and
give exactly the token ids of kvpress's layout, as the runner built them before: with and without a chat
template, with and without a BOS token, query-agnostic and query-aware, on real RULER samples."""

from __future__ import annotations

import json
import shutil

import pytest
from test_eval_runner import ByteTokenizer, _rows

from obinfer.eval import EvalError, protocol, samples, tasks
from obinfer.tokenizer import load_tokenizer


def kvpress_ids(tok, row: dict, mode: str, chat: bool) -> tuple[list[int], list[int]]:
    """The reference: the runner's former ``prompt_ids``, verbatim (kvpress's pipeline).

    agnostic: ``prefix + context`` | ``question + suffix + answer_prefix``;
    aware:    ``prefix + context + question`` | ``suffix + answer_prefix``.
    """
    if chat:
        prefix, suffix = tok.chat_parts()
        bos: list[int] = []
    else:
        prefix, suffix = "", "\n"
        bos = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []
    context, question = row["context"], row["question"]
    if mode == "aware":
        context, question = context + question, ""
    ctx = bos + tok.encode(prefix + context, add_bos=False)
    q = tok.encode(question + suffix + row["answer_prefix"], add_bos=False)
    return ctx, q


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_dir):
    """A real byte-level BPE tokenizer with a ChatML template and no BOS token."""
    return load_tokenizer(tiny_chat_dir)


@pytest.fixture(scope="module")
def bos_tok(tiny_chat_dir, tmp_path_factory):
    """The same tokenizer with a BOS token it adds by default, and no chat template."""
    out = tmp_path_factory.mktemp("bos_tok") / "model"
    shutil.copytree(tiny_chat_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    config.update(bos_token="<|endoftext|>", add_bos_token=True)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(out)
    assert tok.bos_id is not None and not tok.has_chat_template
    return tok


def _ruler_rows(tok) -> list[dict]:
    """Real samples of five RULER tasks, fitted with `tok`, and the runner tests' hand-made rows."""
    count = protocol.count_tokens_fn(tok)
    rows = [
        row
        for task in ("niah_single_1", "niah_multikey_2", "niah_multivalue", "niah_multiquery", "fwe")
        for row in tasks.make_ruler(task, 1200, 2, 42, count, noise_fallback=True)
    ]
    return rows + _rows(2)


def _check_equivalence(tok, chats: tuple[bool, ...]) -> int:
    n = 0
    for row in _ruler_rows(tok):
        for chat in chats:
            for mode in protocol.MODES:
                p = protocol.sample_prompt(tok, row, mode, chat)
                assert (p.prefill, p.after) == kvpress_ids(tok, row, mode, chat), (row["task"], mode, chat)
                n += 1
    return n


def test_sample_prompt_equals_kvpress_layout_byte_tokenizer():
    """A toy tokenizer with a BOS token and a chat template: chat and no chat, agnostic and aware."""
    assert _check_equivalence(ByteTokenizer(), (True, False)) == 12 * 2 * 2


def test_sample_prompt_equals_kvpress_layout_real_tokenizers(chat_tok, bos_tok):
    """Real BPE tokenizers: ChatML without BOS (chat and no chat), a BOS token without a template."""
    assert _check_equivalence(chat_tok, (True, False)) == 12 * 2 * 2
    assert _check_equivalence(bos_tok, (False,)) == 12 * 2
    row = _rows(1)[0]
    no_chat = protocol.sample_prompt(bos_tok, row, "agnostic", chat=False)
    assert no_chat.prefill[0] == bos_tok.bos_id and no_chat.prefill.count(bos_tok.bos_id) == 1


def test_chat_none_follows_the_tokenizer(chat_tok, bos_tok):
    row = _rows(1)[0]
    for tok in (chat_tok, bos_tok):
        p = protocol.sample_prompt(tok, row, "aware", None)
        assert (p.prefill, p.after) == kvpress_ids(tok, row, "aware", tok.has_chat_template)


def test_the_two_parts_cover_the_same_text(chat_tok):
    """Agnostic and aware split one token stream's text at a different place, nothing added or lost."""
    row = _rows(1)[0]
    ag = protocol.sample_prompt(chat_tok, row, "agnostic", True)
    aw = protocol.sample_prompt(chat_tok, row, "aware", True)
    prefix, suffix = chat_tok.chat_parts()
    whole = prefix + row["context"] + row["question"] + suffix + row["answer_prefix"]
    assert chat_tok.decode(ag.prefill + ag.after) == chat_tok.decode(aw.prefill + aw.after) == whole
    assert len(aw.prefill) > len(ag.prefill) and len(aw.after) < len(ag.after)


def test_empty_context_is_an_eval_error(chat_tok):
    row = _rows(1)[0] | {"context": ""}
    with pytest.raises(EvalError, match=r"niah_single_1 #0: empty context or question"):
        protocol.sample_prompt(chat_tok, row, "agnostic", chat=False)  # no BOS, no template: nothing
    assert protocol.sample_prompt(ByteTokenizer(), row, "agnostic", chat=False).prefill == [1]  # BOS only


def test_check_fits_counts_both_parts_and_the_answer():
    row = _rows(1)[0]
    p = protocol.sample_prompt(ByteTokenizer(), row, "agnostic", True)
    protocol.check_fits(row, p, 10, len(p) + 10)
    with pytest.raises(EvalError, match=rf"{len(p)} prompt tokens \+ 11 new tokens exceed the model's"):
        protocol.check_fits(row, p, 11, len(p) + 10)


def test_count_tokens_has_no_bos_or_template(bos_tok):
    count = protocol.count_tokens_fn(bos_tok)
    assert count("The sky is blue.") == len(bos_tok.encode("The sky is blue.", add_bos=False))
    assert count("The sky is blue.") == len(bos_tok.encode("The sky is blue.")) - 1


def test_check_lengths_covers_every_task_and_length():
    samples.check_lengths(["niah_single_1", "niah_multikey_1"], [560, 600], limit=512, max_new_tokens=3)
    with pytest.raises(EvalError, match="too small for niah_single_1"):
        samples.check_lengths(["vt", "niah_single_1"], [100])  # vt answers 30 tokens, niah 128
    with pytest.raises(EvalError, match="does not fit the model: niah_single_1"):
        samples.check_lengths(["niah_single_1"], [1024], limit=512)
