"""Verifiable format constraints of the embedded instruction-following task (IFEval-like).

Each constraint family is a small class with

* ``name``;
* ``sample_params(rng, text=None) -> dict`` (``text``: an optional base answer, used to pick
  parameters that the plain answer does not already satisfy);
* ``instruction(params) -> str``: one fixed English sentence;
* ``parse(prompt) -> list[dict]``: the params of every occurrence of that exact sentence in
  a prompt (regex);
* ``check(response, params) -> bool``;
* ``comply(text, params, rng) -> str``: rewrite a plain one-paragraph answer so that it
  satisfies the constraint (used to generate data only).

``comply_all`` applies several constraints in a fixed order so that they do not undo each
other. Pairs that cannot be satisfied together are listed in ``INCOMPATIBLE``.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

# --------------------------------------------------------------------------- text helpers
from reward_models.topics import EVAL_TOPICS as _EVAL  # noqa: E402
from reward_models.topics import TRAIN_TOPICS as _TRAIN

_PROPER = frozenset(w for t in _TRAIN + _EVAL for w in t.split() if w[:1].isupper()) | frozenset(
    "Earth Sun English America Europe Asia Africa Americans Europeans Internet".split()
)
WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['\u2019\-][A-Za-z0-9]+)*")
_BULLET_RE = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+")
_ABBREV = frozenset("e.g i.e etc vs mr mrs ms dr st jr sr prof approx no fig u.s u.k a.m p.m".split())
_SENT_END_RE = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s+|$)")
_TERMINAL_RE = re.compile(r"[.!?][\"'\u201d\u2019)\]*_]*$")


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def word_count(text: str) -> int:
    return len(WORD_RE.findall(text))


def ends_with_terminal(text: str) -> bool:
    return bool(_TERMINAL_RE.search(text.rstrip()))


def split_sentences(text: str) -> list[str]:
    """Split into sentences (also at line breaks), ignoring common abbreviations."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        start = 0
        for m in _SENT_END_RE.finditer(line):
            before = line[start : m.start()].split()
            last = before[-1].lower().strip("(\"'") if before else ""
            if m.group().startswith(".") and (last in _ABBREV or (len(last) == 1 and last.isalpha())):
                continue
            piece = line[start : m.end()].strip()
            if piece:
                out.append(piece)
            start = m.end()
        rest = line[start:].strip()
        if rest:
            out.append(rest)
    return out


def parse_json_object(text: str) -> Any:
    """The value of ``text`` parsed as JSON, or None when it is not valid JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _json_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _json_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _json_strings(v)]
    return []


_FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)


def strip_code_fence(text: str) -> str:
    m = _FENCE_RE.match(text.strip())
    return m.group(1).strip() if m else text.strip()


def extract_content(response: str) -> str:
    """The prose of a response: JSON string values, bullet texts, without wrapping quotes."""
    text = strip_code_fence(response.strip())
    if text[:1] in "{[":
        value = parse_json_object(text)
        if isinstance(value, (dict, list)):
            return "\n".join(s.strip() for s in _json_strings(value) if s.strip())
    lines = [_BULLET_RE.sub("", ln).strip() for ln in text.splitlines()]
    text = "\n".join(ln for ln in lines if ln)
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].strip()
    return text


def _looks_proper(word: str, text: str) -> bool:
    """A name-like first word: "I", an acronym, or capitalised elsewhere in mid-sentence."""
    if word == "I" or word.startswith(("I'", "I\u2019")) or (len(word) > 1 and word.isupper()):
        return True
    if word in _PROPER:
        return True
    return re.search(rf"(?<![.!?]\s)(?<!^)\b{re.escape(word)}\b", text[len(word) :].lstrip()) is not None


def decapitalize(text: str) -> str:
    """Lower-case the first letter unless the first word looks like a name (or is "I")."""
    m = WORD_RE.search(text)
    if not m or m.start() != 0:
        return text
    first = m.group()
    if not first[:1].isupper() or _looks_proper(first, text):
        return text
    return text[0].lower() + text[1:]


def capitalize_first(text: str) -> str:
    for i, ch in enumerate(text):
        if ch.isalpha():
            return text[:i] + ch.upper() + text[i + 1 :]
    return text


def ensure_terminal(text: str) -> str:
    text = text.rstrip().rstrip(",;:-\u2013\u2014").rstrip()
    return text if ends_with_terminal(text) else text + "."


_CLAUSE_SPLIT_RE = re.compile(r"[,;]\s+")
# where a sentence may be split in two: "; " or ", and/but/so/yet" (the right side is a clause)
# (after ", and" only a clause that starts with a pronoun, not the last item of a list)
_CLAUSE_BOUNDARY_RE = re.compile(
    r";\s+|,\s+(?:but|so|yet)\s+(?!then\b)"
    r"|,\s+and\s+(?=(?:it|its|they|this|these|he|she|we|you|there|i|that|those|their|our|your)\b)",
    re.I,
)


def split_clauses(sentence: str, min_words: int = 4) -> list[str] | None:
    """Split one sentence at its most central comma/semicolon into two full pieces, or None."""
    body = sentence.rstrip()
    best = None
    for m in _CLAUSE_BOUNDARY_RE.finditer(body):
        left, right = body[: m.start()], body[m.end() :]
        if word_count(left) >= min_words and word_count(right) >= min_words:
            balance = abs(word_count(left) - word_count(right))
            if best is None or balance < best[0]:
                best = (balance, left, right)
    if best is None:
        return None
    return [ensure_terminal(capitalize_first(best[1].strip())), ensure_terminal(capitalize_first(best[2].strip()))]


def to_pieces(text: str, n: int) -> list[str] | None:
    """Exactly ``n`` sentence-like pieces of ``text`` (merging or splitting clauses), or None."""
    pieces = [ensure_terminal(s) for s in split_sentences(text)]
    while len(pieces) < n:
        order = sorted(range(len(pieces)), key=lambda i: -word_count(pieces[i]))
        for i in order:
            parts = split_clauses(pieces[i])
            if parts:
                pieces[i : i + 1] = parts
                break
        else:
            return None
    if len(pieces) > n:
        # merge contiguous sentences into n groups of about equal word count
        total = sum(word_count(p) for p in pieces)
        groups: list[list[str]] = [[] for _ in range(n)]
        acc = 0
        for k, p in enumerate(pieces):
            remaining_pieces = len(pieces) - k
            g = min(n - 1, int(acc * n / max(total, 1)))
            # never leave a later group empty
            g = max(g, n - remaining_pieces)
            groups[g].append(p)
            acc += word_count(p)
        if any(not g for g in groups):
            return None
        pieces = [" ".join(g) for g in groups]
    return pieces


# --------------------------------------------------------------------------- families
class Constraint:
    name: str = ""
    pattern: re.Pattern

    def sample_params(self, rng: random.Random, text: str | None = None) -> dict:
        return {}

    def instruction(self, params: dict) -> str:
        raise NotImplementedError

    def parse(self, prompt: str) -> list[dict]:
        return [self._params_from_match(m) for m in self.pattern.finditer(prompt)]

    def _params_from_match(self, m: re.Match) -> dict:
        return {}

    def check(self, response: str, params: dict) -> bool:
        raise NotImplementedError

    def comply(self, text: str, params: dict, rng: random.Random | None = None) -> str:
        raise NotImplementedError

    def extra_words(self, params: dict) -> int:
        """Words that ``comply`` may add (a word limit applied earlier keeps room for them)."""
        return 0

    def extra_sentences(self, params: dict) -> int:
        """Sentences that ``comply`` adds (a sentence count applied earlier keeps room for them)."""
        return 0

    def __repr__(self) -> str:
        return f"<constraint {self.name}>"


class WordLimit(Constraint):
    name = "word_limit"
    pattern = re.compile(r"Answer in at most (\d+) words\.")
    low, high = 15, 35

    def sample_params(self, rng, text=None):
        return {"n": rng.randint(self.low, self.high)}

    def instruction(self, params):
        return f"Answer in at most {params['n']} words."

    def _params_from_match(self, m):
        return {"n": int(m.group(1))}

    def check(self, response, params):
        return word_count(extract_content(response)) <= params["n"]

    def comply(self, text, params, rng=None):
        n = params["n"]
        if word_count(text) <= n:
            return text
        kept: list[str] = []
        total = 0
        for s in split_sentences(text):
            w = word_count(s)
            if total + w > n:
                break
            kept.append(s)
            total += w
        if kept:
            return " ".join(kept)
        first = split_sentences(text)[0]
        # cut the first sentence at its last clause boundary that fits, else at n words
        best = None
        for m in _CLAUSE_SPLIT_RE.finditer(first):
            if 4 <= word_count(first[: m.start()]) <= n:
                best = first[: m.start()]
        if best is None:
            toks = first.split()
            cut: list[str] = []
            for t in toks:
                if word_count(" ".join(cut + [t])) > n:
                    break
                cut.append(t)
            while cut and cut[-1].lower().strip(",;:") in _DANGLING:
                cut.pop()
            best = " ".join(cut)
        return ensure_terminal(best)


_DANGLING = frozenset(
    "a an the and or but of in on at to for from by with as that which who is are was were be "
    "its their his her our your this these those such very more most than into over".split()
)


class Lowercase(Constraint):
    name = "lowercase"
    pattern = re.compile(r"Your entire response should be in lowercase letters\.")

    def instruction(self, params):
        return "Your entire response should be in lowercase letters."

    def check(self, response, params):
        return not any(ch.isupper() for ch in response)

    def comply(self, text, params, rng=None):
        return text.lower()


END_PHRASES = [
    "Hope this helps!",
    "Let me know if you have questions.",
    "Thanks for asking!",
    "I hope this is useful.",
    "That is the short version.",
    "Is there anything else?",
]


class EndPhrase(Constraint):
    name = "end_phrase"
    pattern = re.compile(r'Finish your response with the exact phrase "([^"\n]+)" and nothing after it\.')

    def sample_params(self, rng, text=None):
        return {"phrase": rng.choice(END_PHRASES)}

    def instruction(self, params):
        return f'Finish your response with the exact phrase "{params["phrase"]}" and nothing after it.'

    def _params_from_match(self, m):
        return {"phrase": m.group(1)}

    def check(self, response, params):
        return response.strip().endswith(params["phrase"])

    def comply(self, text, params, rng=None):
        text = text.rstrip()
        if text.endswith(params["phrase"]):
            return text
        return ensure_terminal(text) + " " + params["phrase"]

    def extra_words(self, params):
        return word_count(params["phrase"])

    def extra_sentences(self, params):
        return len(split_sentences(params["phrase"]))


# keyword -> the sentence opener that brings it in naturally
KEYWORDS: dict[str, str] = {
    "example": "For example, ",
    "practice": "In practice, ",
    "everyday": "In everyday life, ",
    "general": "In general, ",
    "short": "In short, ",
    "fact": "In fact, ",
    "course": "Of course, ",
    "addition": "In addition, ",
    "interestingly": "Interestingly, ",
    "importantly": "Importantly, ",
    "overall": "Overall, ",
    "typically": "Typically, ",
    "essentially": "Essentially, ",
    "notably": "Notably, ",
    "simply": "Simply put, ",
    "surprisingly": "Surprisingly, ",
}


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text, re.I) is not None


class Keyword(Constraint):
    name = "keyword"
    pattern = re.compile(r'Include the word "([A-Za-z]+)" in your response\.')

    def sample_params(self, rng, text=None):
        options = [k for k in KEYWORDS if text is None or not _has_word(text, k)]
        return {"word": rng.choice(options or list(KEYWORDS))}

    def instruction(self, params):
        return f'Include the word "{params["word"]}" in your response.'

    def _params_from_match(self, m):
        return {"word": m.group(1)}

    def check(self, response, params):
        return _has_word(extract_content(response), params["word"])

    def comply(self, text, params, rng=None):
        word = params["word"]
        if _has_word(text, word):
            return text
        opener = KEYWORDS.get(word)
        if opener is None:
            return ensure_terminal(text) + f" The word to remember is {word}."
        sents = split_sentences(text)
        i = 1 if len(sents) > 1 else 0
        sents[i] = opener + decapitalize(sents[i])
        return " ".join(sents)

    def extra_words(self, params):
        return word_count(KEYWORDS.get(params["word"], "The word to remember is x"))


class Bullets(Constraint):
    name = "bullets"
    pattern = re.compile(r'Answer with exactly (\d+) bullet points, each on its own line starting with "- "\.')
    low, high = 2, 4

    def sample_params(self, rng, text=None):
        options = list(range(self.low, self.high + 1))
        if text is not None:  # prefer counts the answer can be split into
            options = [n for n in options if to_pieces(text, n) is not None] or options
        return {"n": rng.choice(options)}

    def instruction(self, params):
        return f'Answer with exactly {params["n"]} bullet points, each on its own line starting with "- ".'

    def _params_from_match(self, m):
        return {"n": int(m.group(1))}

    def check(self, response, params):
        lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
        return len(lines) == params["n"] and all(ln.startswith("- ") and word_count(ln) >= 1 for ln in lines)

    def comply(self, text, params, rng=None):
        pieces = to_pieces(text, params["n"])
        if pieces is None:
            return text  # cannot comply; the caller verifies with check()
        return "\n".join("- " + capitalize_first(p) for p in pieces)


class NoCommas(Constraint):
    name = "no_commas"
    pattern = re.compile(r"Do not use any commas in your response\.")

    def instruction(self, params):
        return "Do not use any commas in your response."

    def check(self, response, params):
        return "," not in response and "\uff0c" not in response

    def comply(self, text, params, rng=None):
        text = re.sub(r"(\d),(\d{3})", r"\1\2", text)
        text = re.sub(r"\s*,\s*", " ", text.replace("\uff0c", ","))
        return re.sub(r"[ \t]{2,}", " ", text).strip()


JSON_KEYS = ["answer", "response", "explanation", "summary"]


class JsonFormat(Constraint):
    name = "json"
    pattern = re.compile(r'Format your entire response as a JSON object with the single key "([a-z_]+)"\.')

    def sample_params(self, rng, text=None):
        return {"key": rng.choice(JSON_KEYS)}

    def instruction(self, params):
        return f'Format your entire response as a JSON object with the single key "{params["key"]}".'

    def _params_from_match(self, m):
        return {"key": m.group(1)}

    def check(self, response, params):
        value = parse_json_object(response.strip())
        return (
            isinstance(value, dict)
            and list(value) == [params["key"]]
            and isinstance(value[params["key"]], str)
            and value[params["key"]].strip() != ""
        )

    def comply(self, text, params, rng=None):
        return json.dumps({params["key"]: text}, ensure_ascii=False)


START_WORDS = ["Sure", "Honestly", "Basically", "Well", "Actually", "Certainly", "Absolutely", "Okay"]


class StartsWith(Constraint):
    name = "starts_with"
    pattern = re.compile(r'Start your response with the word "([A-Za-z]+)"\.')

    def sample_params(self, rng, text=None):
        return {"word": rng.choice(START_WORDS)}

    def instruction(self, params):
        return f'Start your response with the word "{params["word"]}".'

    def _params_from_match(self, m):
        return {"word": m.group(1)}

    def check(self, response, params):
        m = WORD_RE.match(response.strip())
        return m is not None and m.group().lower() == params["word"].lower()

    def comply(self, text, params, rng=None):
        if self.check(text, params):
            return text
        return f"{params['word']}, {decapitalize(text.strip())}"

    def extra_words(self, params):
        return 1


class Quotes(Constraint):
    name = "quotes"
    pattern = re.compile(r"Wrap your entire response in double quotation marks\.")

    def instruction(self, params):
        return "Wrap your entire response in double quotation marks."

    def check(self, response, params):
        s = response.strip()
        return len(s) > 2 and s[0] == '"' and s[-1] == '"'

    def comply(self, text, params, rng=None):
        return f'"{text.strip()}"'


class NSentences(Constraint):
    name = "n_sentences"
    pattern = re.compile(r"Answer in exactly (\d+) sentences\.")
    low, high = 2, 3

    def sample_params(self, rng, text=None):
        options = list(range(self.low, self.high + 1))
        if text is not None:
            options = [n for n in options if to_pieces(text, n) is not None] or options
        return {"n": rng.choice(options)}

    def instruction(self, params):
        return f"Answer in exactly {params['n']} sentences."

    def _params_from_match(self, m):
        return {"n": int(m.group(1))}

    def check(self, response, params):
        return len(split_sentences(extract_content(response))) == params["n"]

    def comply(self, text, params, rng=None):
        n = params["n"]
        sents = split_sentences(text)
        if len(sents) >= n:
            return " ".join(sents[:n])
        pieces = to_pieces(text, n)
        return " ".join(pieces) if pieces else text


FAMILIES: list[Constraint] = [
    WordLimit(),
    Lowercase(),
    EndPhrase(),
    Keyword(),
    Bullets(),
    NoCommas(),
    JsonFormat(),
    StartsWith(),
    Quotes(),
    NSentences(),
]
BY_NAME: dict[str, Constraint] = {f.name: f for f in FAMILIES}
FAMILY_NAMES: list[str] = [f.name for f in FAMILIES]

INCOMPATIBLE: frozenset[frozenset[str]] = frozenset(
    frozenset(p)
    for p in [
        ("json", "bullets"),
        ("json", "starts_with"),
        ("json", "end_phrase"),
        ("json", "quotes"),
        ("bullets", "n_sentences"),
        ("bullets", "starts_with"),
        ("bullets", "quotes"),
        ("lowercase", "end_phrase"),
        ("lowercase", "starts_with"),
        ("quotes", "starts_with"),
        ("quotes", "end_phrase"),
        ("word_limit", "n_sentences"),
    ]
)

# the order in which comply() rewrites are applied
APPLY_ORDER: list[str] = [
    "n_sentences",
    "word_limit",
    "keyword",
    "starts_with",
    "bullets",
    "end_phrase",
    "no_commas",
    "lowercase",
    "quotes",
    "json",
]


def compatible(a: str, b: str) -> bool:
    return a != b and frozenset((a, b)) not in INCOMPATIBLE


def comply_all(text: str, constraints: list[tuple[str, dict]], rng: random.Random | None = None) -> str:
    """Apply every constraint's ``comply`` in ``APPLY_ORDER`` (word limits keep room for additions)."""
    rng = rng or random.Random(0)
    by = dict(constraints)
    for name in APPLY_ORDER:
        if name not in by:
            continue
        params = by[name]
        if name == "word_limit":
            reserve = sum(BY_NAME[o].extra_words(p) for o, p in constraints if o != name)
            params = {**params, "n": max(6, params["n"] - reserve)}
        elif name == "n_sentences":
            reserve = sum(BY_NAME[o].extra_sentences(p) for o, p in constraints if o != name)
            params = {**params, "n": max(1, params["n"] - reserve)}
        text = BY_NAME[name].comply(text, params, rng)
    return text


# Held-out phrasings: every constraint said in words no training prompt uses, for the evaluation split
# ``eval_prompts_rephrased.jsonl`` (a gain that holds only for the training phrasing shows up there). The
# judge parses both phrasings to the same parameters; each regex has the training pattern's groups.
HELD_OUT_PHRASINGS: dict[str, tuple[str, re.Pattern]] = {
    "word_limit": ("Keep your reply to {n} words or fewer.", re.compile(r"Keep your reply to (\d+) words or fewer\.")),
    "lowercase": ("Use no capital letters anywhere in your reply.",
                  re.compile(r"Use no capital letters anywhere in your reply\.")),
    "end_phrase": ('Make "{phrase}" the very last words of your reply.',
                   re.compile(r'Make "([^"\n]+)" the very last words of your reply\.')),
    "keyword": ('Mention the word "{word}" somewhere in your reply.',
                re.compile(r'Mention the word "([A-Za-z]+)" somewhere in your reply\.')),
    "bullets": ('Reply as a list of {n} items, one per line, each beginning with "- ".',
                re.compile(r'Reply as a list of (\d+) items, one per line, each beginning with "- "\.')),
    "no_commas": ("Avoid the comma character entirely.", re.compile(r"Avoid the comma character entirely\.")),
    "json": ('Reply only with JSON: an object whose one key is "{key}".',
             re.compile(r'Reply only with JSON: an object whose one key is "([a-z_]+)"\.')),
    "starts_with": ('Make "{word}" the first word of your reply.',
                    re.compile(r'Make "([A-Za-z]+)" the first word of your reply\.')),
    "quotes": ("Put your whole reply inside double quotes.",
               re.compile(r"Put your whole reply inside double quotes\.")),
    "n_sentences": ("Write {n} sentences, no more and no fewer.",
                    re.compile(r"Write (\d+) sentences, no more and no fewer\.")),
}  # fmt: skip


def _patterns(fam: Constraint) -> tuple[re.Pattern, ...]:
    held_out = HELD_OUT_PHRASINGS.get(fam.name)
    return (fam.pattern,) if held_out is None else (fam.pattern, held_out[1])


def parse_constraints(prompt: str) -> list[tuple[str, dict]]:
    """Every constraint sentence found in ``prompt`` (training or held-out phrasing), in prompt order."""
    found: list[tuple[int, str, dict]] = []
    for fam in FAMILIES:
        for pattern in _patterns(fam):
            for m in pattern.finditer(prompt):
                found.append((m.start(), fam.name, fam._params_from_match(m)))
    found.sort(key=lambda x: x[0])
    return [(name, params) for _, name, params in found]


def instruction_spans(prompt: str) -> list[tuple[int, int]]:
    spans = [(m.start(), m.end()) for fam in FAMILIES for p in _patterns(fam) for m in p.finditer(prompt)]
    return sorted(spans)


def rephrase(prompt: str) -> str:
    """``prompt`` with every training-phrased constraint sentence in its held-out phrasing (same parameters)."""
    for fam in FAMILIES:
        template = HELD_OUT_PHRASINGS[fam.name][0]
        prompt = fam.pattern.sub(lambda m, f=fam, t=template: t.format(**f._params_from_match(m)), prompt)
    return prompt


def check_all(response: str, constraints: list[tuple[str, dict]]) -> list[tuple[str, bool]]:
    return [(name, bool(BY_NAME[name].check(response, params))) for name, params in constraints]
