"""Answer extraction, normalisation and majority voting for math-style answers.

Extraction order (the first rule that finds something wins; within a rule the *last*
occurrence in the text wins, because reasoning models restate the final result last):
  1. `\\boxed{...}` / `\\fbox{...}` with balanced (nested) braces
  2. an answer phrase: "answer is X", "Answer: X", "final answer: X", "#### X"
  3. the last number in the text
Rules 1-2 accept multiple-choice letters ("(B)", "B", "B)"), rule 3 only numbers.
Strict extraction (what `aggregate: auto` votes with, server.aggregation) replaces rule 3 by
"the number of a short answer" (a short final line holding one number, or a reply that is
one short line) and never reads one out of code, a list or a date/time, so list
numbering, `s[::-1]` and "October 3" are not answers.

Normalisation makes equal values equal keys: thousands separators go ("1,234" -> "1234"),
unicode digits and minus signs become ASCII, "$", "%", units and `\\text{}` go, and numbers
are compared as exact fractions, so "0.5", "1/2", "\\frac{1}{2}", "\\dfrac12" and "0.50" all
vote together; the key is written as an integer, a terminating decimal, or "p/q".

Voting: samples without an extractable answer abstain. The answer with the most votes
wins. Tie rule (deterministic): among tied answers the one whose supporting samples have
the highest mean per-token log-probability wins; if log-probabilities are missing or
equal, the answer that appeared first in sample order wins. The winning *sample* (whose
text the server returns) is the highest-log-probability sample among the winner's voters,
first in order on ties. Agreement = winner's votes / samples that voted.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

# Only the tail of very long outputs is searched: the answer is stated at the end, and it
# bounds the work adversarial inputs can cause.
MAX_SCAN_CHARS = 20_000
MAX_ANSWER_CHARS = 200
MAX_BOXED_CHARS = 2_000

# A sign counts only where it cannot be a binary minus ("10-3" is 10 and 3, not -3).
_NUMBER = r"(?:(?<![\w).])[-+])?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(rf"{_NUMBER}(?:\s*/\s*\d+(?![.,]\d))?")
_FRACTION_RE = re.compile(r"^([-+]?)\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))$")
_PLAIN_FRACTION_RE = re.compile(r"^([-+]?\d+(?:\.\d+)?)\s*/\s*([-+]?\d+(?:\.\d+)?)$")
_PHRASE_RE = re.compile(
    rf"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=|was)\s*:?\s*(?P<rest>[^\n]{{0,{MAX_ANSWER_CHARS}}})"
    rf"|####\s*(?P<hash>[^\n]{{0,{MAX_ANSWER_CHARS}}})",
    re.IGNORECASE,
)
_CHOICE_RE = re.compile(r"^\(\s*([A-Ea-e])\s*\)|^([A-E])(?:\s*\)|\s*[.:,;]|\s*$)")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_UNICODE_MINUS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\uff0d": "-", "\u00a0": " "})


@dataclass(frozen=True)
class Vote:
    answer: str | None  # normalised winning answer; None when no sample had one
    votes: dict[str, int]  # answer -> number of samples, most votes first
    agreement: float  # winner's votes / samples that voted (0.0 when none voted)
    winner_index: int  # index of the sample whose completion is returned
    num_voters: int
    tie: bool = False  # True when the tie rule decided the winner
    answers: list[str | None] = field(default_factory=list)  # per-sample extracted answers


def _ascii_digits(text: str) -> str:
    """NFKC (full-width forms) plus any unicode decimal digit mapped to ASCII."""
    text = unicodedata.normalize("NFKC", text).translate(_UNICODE_MINUS)
    if text.isascii():
        return text
    return "".join(str(unicodedata.decimal(ch)) if ch.isdecimal() else ch for ch in text)


def find_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent/unbalanced."""
    for marker in ("\\boxed", "\\fbox"):
        start = text.rfind(marker)
        while start != -1:
            i = start + len(marker)
            while i < len(text) and text[i] == " ":
                i += 1
            if i < len(text) and text[i] == "{":
                depth = 0
                # Bounded scan: a boxed answer longer than this is not an answer, and the
                # bound keeps many unbalanced markers from costing quadratic time.
                for j in range(i, min(len(text), i + MAX_BOXED_CHARS)):
                    if text[j] == "{":
                        depth += 1
                    elif text[j] == "}":
                        depth -= 1
                        if depth == 0:
                            return text[i + 1 : j]
            start = text.rfind(marker, 0, start)
    return None


def _fraction_key(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:  # terminating decimal
        digits = max(len(str(value.denominator)), 1) + 2
        text = f"{float(value):.{digits}f}".rstrip("0").rstrip(".")
        if Fraction(text) == value:
            return text
    return f"{value.numerator}/{value.denominator}"


def _parse_number(text: str) -> Fraction | None:
    text = text.strip().replace(",", "").replace(" ", "")
    if not text:
        return None
    try:
        if m := _PLAIN_FRACTION_RE.match(text):
            denominator = Fraction(m.group(2))
            return None if denominator == 0 else Fraction(m.group(1)) / denominator
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_answer(raw: str) -> str | None:
    """Canonical key for an answer string, or None when nothing usable is left."""
    text = _TEXT_WRAP_RE.sub(r"\1", _ascii_digits(raw)).strip()
    while len(text) >= 2 and text[0] == "{" and text[-1] == "}":
        text = text[1:-1].strip()
    if not text:
        return None
    if m := _CHOICE_RE.match(text):
        return (m.group(1) or m.group(2)).upper()
    text = text.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    text = text.strip().rstrip(".").strip()
    # "x = 5" -> "5"
    if "=" in text:
        text = text.rsplit("=", 1)[1].strip()
    if m := _FRACTION_RE.match(text.replace(" ", "")):
        sign, num, num_digit, den, den_digit = m.groups()
        numerator = _parse_number(num if num is not None else num_digit)
        denominator = _parse_number(den if den is not None else den_digit)
        if numerator is not None and denominator:
            value = numerator / denominator
            return _fraction_key(-value if sign == "-" else value)
    value = _parse_number(text)
    if value is not None:
        return _fraction_key(value)
    # A number followed by units or words ("42 apples", "12 km/h") -> the number.
    if m := re.match(rf"^({_NUMBER})(?:\s|$)", text):
        value = _parse_number(m.group(1))
        if value is not None:
            return _fraction_key(value)
    compact = re.sub(r"\s+", "", text)
    if not compact or len(compact) > MAX_ANSWER_CHARS:
        return None
    return compact


def _last_number(text: str) -> str | None:
    last = None
    for m in _NUMBER_RE.finditer(text):
        last = m.group(0)
    return last


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The normalised final answer stated in a completion, or None. `strict`: only an
    explicit answer (rules 1-2) or a short final line that is one number (votable_number),
    never a number picked out of prose, lists, code or dates."""
    if not text:
        return None
    text = _ascii_digits(text[-MAX_SCAN_CHARS:])
    answer = _marked_answer(text)
    if answer is not None or strict:
        return answer if answer is not None or not strict else _short_final_number(text)
    # No usable marker: fall back to the last number anywhere.
    number = _last_number(text)
    return normalize_answer(number) if number is not None else None


# Without a marker, strict extraction reads a number only from a short answer: a final line
# that states one number and little else ("18", "6 + 6 = 12", "Total: $45"), or a whole reply
# that is one short line ("4 times 3 is 12.") - never from code, a list or a date/time.
SHORT_LINE_CHARS = 32
SHORT_REPLY_CHARS = 160
_LIST_ITEM_RE = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s", re.M)
_MONTHS = (
    "jan|feb|f[eé]v|mar|m[aä]r|apr|avr|abr|may|mai|jun|juin|jul|juil|aug|ao[uû]|ago|sep|set|oct|okt|ott"
    "|nov|dec|d[eé]c|dez|dic|ene|gen|giu|lug|mag"
)
_DATE_TIME_RE = re.compile(
    r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}/\d{1,2}/\d{2,4}|\d{1,2}:\d{2}|\d\s*(?:am|pm|h)\b"
    rf"|\b(?:{_MONTHS})[a-zéû]*\.?\s+\d|\d{{1,2}}\.?\s+(?:de\s+)?(?:{_MONTHS})",
    re.IGNORECASE,
)
_CODE_RE = re.compile(
    r"```|^\s*(?:def |class |return |import |for |if |print\(|#include|function )|[;{}]\s*$", re.M
)


def _short_final_number(text: str) -> str | None:
    """The number a short answer states, or None (the text has no votable answer)."""
    body = text.strip()
    if not body or _CODE_RE.search(body) or _LIST_ITEM_RE.search(body):
        return None
    last = body.split("\n")[-1].strip()
    if _DATE_TIME_RE.search(last):
        return None
    if len(last) <= SHORT_LINE_CHARS:
        stated = last.rsplit("=", 1)[-1]  # "6 + 6 = 12": the result
        numbers = [m.group(0) for m in _NUMBER_RE.finditer(stated)]
        if len(numbers) == 1 and not re.search(r"[A-Za-z]{3,}.*[A-Za-z]{3,}.*[A-Za-z]{3,}", stated):
            return normalize_answer(numbers[0])
    if "\n" not in body and len(body) <= SHORT_REPLY_CHARS and (number := _last_number(body)) is not None:
        return normalize_answer(number)
    return None


def has_marked_answer(text: str) -> bool:
    """Whether a completion marks its answer (rules 1-2: \\boxed{}, "Answer:", "####"...)."""
    return bool(text) and _marked_answer(_ascii_digits(text[-MAX_SCAN_CHARS:])) is not None


def _marked_answer(text: str) -> str | None:
    """Rules 1-2: a boxed answer, else the last answer phrase."""
    boxed = find_boxed(text)
    if boxed is not None and (answer := normalize_answer(boxed)) is not None:
        return answer
    phrase = None
    for m in _PHRASE_RE.finditer(text):
        phrase = m.group("rest") if m.group("rest") is not None else m.group("hash")
    if phrase is not None:
        phrase = phrase.strip()
        if m := _CHOICE_RE.match(phrase):
            return (m.group(1) or m.group(2)).upper()
        if (boxed := find_boxed(phrase)) is not None and (answer := normalize_answer(boxed)) is not None:
            return answer
        if m := re.match(r"^\$?\\[dt]?frac\s*(?:\{[^{}]*\}|\d)\s*(?:\{[^{}]*\}|\d)", phrase):
            return normalize_answer(m.group(0).lstrip("$"))
        if (number := _first_number(phrase)) is not None:
            return normalize_answer(number)
    return None


def numbers_in(text: str) -> set[str]:
    """The normalised keys of every number stated in `text` (e.g. a prompt's, so a vote can
    tell an answer copied from it)."""
    keys = (normalize_answer(m.group(0)) for m in _NUMBER_RE.finditer(_ascii_digits(text[:MAX_SCAN_CHARS])))
    return {k for k in keys if k is not None}


def _first_number(text: str) -> str | None:
    m = _NUMBER_RE.search(text)
    return m.group(0) if m else None


def majority_vote(answers: Sequence[str | None], mean_logprobs: Sequence[float | None] | None = None) -> Vote:
    """Vote over already-extracted answers (see the module docstring for the tie rule)."""
    if mean_logprobs is None:
        mean_logprobs = [None] * len(answers)
    if len(mean_logprobs) != len(answers):
        raise ValueError("answers and mean_logprobs differ in length")
    scores = [lp if lp is not None and math.isfinite(lp) else -math.inf for lp in mean_logprobs]

    counts: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    logprob_sum: dict[str, float] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first_seen.setdefault(answer, i)
        logprob_sum[answer] = logprob_sum.get(answer, 0.0) + scores[i]

    def best_sample(candidates: list[int]) -> int:
        # max() keeps the first of equal scores, so order breaks ties.
        return max(candidates, key=lambda i: scores[i]) if candidates else 0

    if not counts:
        return Vote(None, {}, 0.0, best_sample(list(range(len(answers)))), 0, False, list(answers))

    top = max(counts.values())
    tied = [a for a in counts if counts[a] == top]
    # Sort key: higher mean log-prob first, then earlier first appearance.
    tied.sort(key=lambda a: (-(logprob_sum[a] / counts[a]), first_seen[a]))
    winner = tied[0]
    voters = sum(counts.values())
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], first_seen[kv[0]])))
    winner_index = best_sample([i for i, a in enumerate(answers) if a == winner])
    return Vote(winner, ordered, top / voters, winner_index, voters, len(tied) > 1, list(answers))
