"""Programmatic gold judge of the embedded instruction-following task.

``judge(prompt, response)`` parses the constraint sentences of the prompt (see
``constraints.py``), recovers its topic (``topics.match_question``, falling back to the
content words of the question) and scores the response:

* score = 0 when any quality gate fails;
* otherwise the fraction of the prompt's constraints that the response satisfies
  (1.0 when the prompt has no recognised constraint).

The quality gates make the format constraints hard to game: ``empty`` (fewer than 4 words of
content once JSON/bullet syntax is stripped), ``gibberish`` (mostly non-alphabetic or
non-words), ``truncated`` (the last sentence has no terminal . ! ? or a JSON-looking
response does not parse), ``repetitive`` (repeated sentences, low distinct-trigram ratio,
a word repeated in a row or dominating the response), ``off_topic`` (no content word of the
topic, up to simple suffixes, appears) and ``copies_prompt`` (an instruction sentence or the
question is copied back, or most of the response's trigrams come from the prompt).

Pure Python and regex: fast, deterministic, no model.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from reward_models.constraints import (
    BY_NAME,
    check_all,
    ends_with_terminal,
    extract_content,
    instruction_spans,
    parse_constraints,
    parse_json_object,
    split_sentences,
    strip_code_fence,
    word_count,
    words,
)
from reward_models.topics import STOPWORDS, match_question

__all__ = [
    "GATES",
    "JudgeResult",
    "ParsedPrompt",
    "judge",
    "score",
    "parse_prompt",
    "prompt_text",
    "split_sentences",
    "word_count",
    "stem_variants",
    "same_word",
]

GATES = ["empty", "gibberish", "truncated", "repetitive", "off_topic", "copies_prompt"]

MIN_CONTENT_WORDS = 4
MIN_LETTER_RATIO = 0.6
MIN_WORDLIKE_RATIO = 0.7
MIN_DISTINCT_TRIGRAMS = 0.75
MAX_RUN = 3  # the same word this many times in a row is repetitive
MAX_WORD_SHARE = 0.3
MAX_PROMPT_TRIGRAM_SHARE = 0.5


@dataclass
class JudgeResult:
    score: float
    passed_gates: bool
    gate_failures: list[str] = field(default_factory=list)
    constraints: list[tuple[str, bool]] = field(default_factory=list)
    topic: str | None = None


@dataclass
class ParsedPrompt:
    text: str
    question: str
    topic: str | None
    topic_words: list[str]
    constraints: list[tuple[str, dict]]
    instructions: list[str]


# --------------------------------------------------------------------------- prompt side
def prompt_text(prompt) -> str:
    """The text of a prompt given as a string or a list of chat messages (last user turn)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        prompt = [prompt]
    users = [m for m in prompt if m.get("role") == "user"]
    msg = users[-1] if users else (prompt[-1] if prompt else {"content": ""})
    content = msg.get("content", "")
    if isinstance(content, list):  # multimodal-style content parts
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def content_words(text: str) -> list[str]:
    return [w.lower() for w in words(text) if w.lower() not in STOPWORDS and len(w) > 1]


@lru_cache(maxsize=4096)
def parse_prompt(text: str) -> ParsedPrompt:
    constraints = parse_constraints(text)
    spans = instruction_spans(text)
    instructions = [text[a:b] for a, b in spans]
    question = text
    for a, b in reversed(spans):
        question = question[:a] + " " + question[b:]
    question = re.sub(r"\s+", " ", question).strip()
    m = match_question(text.strip()) or match_question(question)
    topic = m[1] if m else None
    topic_words = content_words(topic) if topic else content_words(question)
    return ParsedPrompt(text, question, topic, topic_words, constraints, instructions)


# --------------------------------------------------------------------------- stemming
_SUFFIXES = [
    ("ies", "y"),
    ("ied", "y"),
    ("ing", ""),
    ("ing", "e"),
    ("ed", ""),
    ("ed", "e"),
    ("es", ""),
    ("s", ""),
    ("er", ""),
    ("ly", ""),
    ("al", ""),
]


@lru_cache(maxsize=65536)
def stem_variants(word: str) -> frozenset[str]:
    w = word.lower().replace("\u2019", "'")
    if w.endswith("'s"):
        w = w[:-2]
    out = {w}
    for suf, rep in _SUFFIXES:
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            base = w[: -len(suf)]
            out.add(base + rep)
            if len(base) >= 4 and base[-1] == base[-2] and base[-1] not in "aeiouls":
                out.add(base[:-1])  # running -> run
    return frozenset(out)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def same_word(a: str, b: str) -> bool:
    """True for the same word up to simple suffixes (volcanoes/volcano, erupt/eruption)."""
    va, vb = stem_variants(a), stem_variants(b)
    if va & vb:
        return True
    a, b = a.lower(), b.lower()
    p = _common_prefix(a, b)
    return p >= 5 and p >= min(len(a), len(b)) - 2


# --------------------------------------------------------------------------- gates
def _norm(text: str) -> str:
    return " ".join(w.lower() for w in words(text))


def _trigrams(ws: list[str]) -> list[tuple[str, str, str]]:
    return [tuple(ws[i : i + 3]) for i in range(len(ws) - 2)]


def _looks_like_word(w: str) -> bool:
    if w.isdigit():
        return len(w) <= 6
    lw = w.lower()
    if len(lw) > 20:
        return False
    if not re.search(r"[aeiouy]", lw) and len(lw) > 3:
        return False
    return re.fullmatch(r"[a-z'\u2019\-]+|[a-z0-9]+", lw) is not None


def _gate_empty(content: str) -> bool:
    return sum(1 for w in words(content) if re.search(r"[A-Za-z]", w)) < MIN_CONTENT_WORDS


def _gate_gibberish(content: str) -> bool:
    visible = [c for c in content if not c.isspace()]
    if not visible:
        return True
    letters = sum(c.isalpha() and c.isascii() for c in visible)
    if letters / len(visible) < MIN_LETTER_RATIO:
        return True
    toks = content.split()
    ws = [t.strip(".,;:!?\"'()[]{}*_") for t in toks]
    ws = [w for w in ws if w]
    if not ws:
        return True
    ok = sum(_looks_like_word(w) for w in ws)
    return ok / len(ws) < MIN_WORDLIKE_RATIO


def _gate_truncated(response: str, content: str) -> bool:
    text = strip_code_fence(response.strip())
    if text[:1] in "{[" and parse_json_object(text) is None:
        return True
    if response.strip().startswith("```") and not response.strip().endswith("```"):
        return True
    lines = [ln for ln in content.splitlines() if ln.strip()]
    if not lines:
        return True
    return not ends_with_terminal(lines[-1])


def _gate_repetitive(content: str) -> bool:
    sents = [_norm(s) for s in split_sentences(content)]
    sents = [s for s in sents if len(s.split()) >= 3]
    if len(sents) != len(set(sents)):
        return True
    ws = [w.lower() for w in words(content)]
    run = 1
    for a, b in zip(ws, ws[1:]):
        run = run + 1 if a == b else 1
        if run >= MAX_RUN:
            return True
    tri = _trigrams(ws)
    if len(tri) >= 8 and len(set(tri)) / len(tri) < MIN_DISTINCT_TRIGRAMS:
        return True
    if len(ws) >= 12:
        counts = Counter(w for w in ws if w not in STOPWORDS)
        if counts and counts.most_common(1)[0][1] / len(ws) > MAX_WORD_SHARE:
            return True
    return False


def _gate_off_topic(content: str, topic_words: list[str]) -> bool:
    if not topic_words:
        return False
    resp = set(w.lower() for w in words(content))
    return not any(same_word(t, r) for t in topic_words for r in resp)


def _gate_copies_prompt(response: str, content: str, parsed: ParsedPrompt) -> bool:
    resp_norm = _norm(response)
    for ins in parsed.instructions:
        n = _norm(ins)
        if n and n in resp_norm:
            return True
    q = _norm(parsed.question)
    if q and len(q.split()) >= 4 and q in _norm(content):
        return True
    # most of the response comes from the prompt (quoted phrases excluded: end phrases etc.)
    prompt_wo_quotes = re.sub(r'"[^"\n]*"', " ", parsed.text)
    ptri = set(_trigrams([w.lower() for w in words(prompt_wo_quotes)]))
    rtri = _trigrams([w.lower() for w in words(content)])
    if len(rtri) >= 3 and sum(t in ptri for t in rtri) / len(rtri) >= MAX_PROMPT_TRIGRAM_SHARE:
        return True
    return False


def gate_failures(parsed: ParsedPrompt, response: str) -> list[str]:
    content = extract_content(response)
    fails: list[str] = []
    if _gate_empty(content):
        fails.append("empty")
    if content.strip() and _gate_gibberish(content):
        fails.append("gibberish")
    if _gate_truncated(response, content):
        fails.append("truncated")
    if _gate_repetitive(content):
        fails.append("repetitive")
    if content.strip() and _gate_off_topic(content, parsed.topic_words):
        fails.append("off_topic")
    if content.strip() and _gate_copies_prompt(response, content, parsed):
        fails.append("copies_prompt")
    return fails


# --------------------------------------------------------------------------- judge
def judge(prompt, response: str) -> JudgeResult:
    """Score ``response`` (assistant text) to ``prompt`` (a string or chat messages) in [0, 1]."""
    parsed = parse_prompt(prompt_text(prompt))
    response = (response or "").strip()
    fails = gate_failures(parsed, response)
    results = check_all(response, parsed.constraints)
    if fails:
        value = 0.0
    elif results:
        value = sum(ok for _, ok in results) / len(results)
    else:
        value = 1.0
    return JudgeResult(float(value), not fails, fails, results, parsed.topic)


def score(prompt, response: str) -> float:
    return judge(prompt, response).score


assert set(BY_NAME) >= {
    "word_limit",
    "lowercase",
    "end_phrase",
    "keyword",
    "bullets",
    "no_commas",
    "json",
    "starts_with",
}
