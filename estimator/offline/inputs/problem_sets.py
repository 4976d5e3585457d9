"""The problems `t2serve label` labels: the built-in generator's, or a data file's
(estimator.offline.inputs.datasets), narrowed to a count and a split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from estimator.offline.inputs import datasets
from estimator.offline.inputs.problems import Problem, generate

BUILTIN_COUNT = 600  # the generator's problems when no count is asked for


@dataclass(frozen=True)
class ProblemSet:
    problems: list[Problem]
    summary: str | None  # a data file's: its problems, and the rows left out and why


def select_problems(
    data: str,
    *,
    template: str,
    seed: int,
    count: int | None = None,
    split: str | None = None,
    families: list[str] | None = None,
    **read_options: Any,
) -> ProblemSet:
    """`data` is "builtin" (the generator: `count` problems drawn with `seed`) or a data file
    for datasets.read (with `read_options`; all its problems, or the first `count` in a
    stable hash order); then only `split`'s. ValueError when nothing usable is left."""
    summary = None
    if data == "builtin":
        problems = generate(count or BUILTIN_COUNT, seed=seed, families=families, template=template)
    else:
        dataset = datasets.read(data, template=template, families=families, **read_options)
        problems = dataset.problems
        left_out = ", ".join(f"{n} {why}" for why, n in dataset.skipped.items()) or "none"
        summary = f"{dataset.source}: {len(problems)} problems; left out: {left_out}"
        if count:
            problems = datasets.stable_subset(problems, count)
    if not problems:
        raise ValueError(f"no usable problems in {data}" + (f" ({summary})" if summary else ""))
    if split:
        problems = [p for p in problems if p.split == split]
    return ProblemSet(problems, summary)
