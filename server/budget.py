"""A request's token budget: every token its samples generate, across its prompts and
choices, counts against one limit (the `max_total_tokens` extension field, bounded by
--max-request-tokens). `auto` multiplies a sample's cost by N, and a request without
`max_tokens` may decode the whole context left in every sample: the budget is what bounds
the cost of one request.

When the count reaches the limit, `exhausted` is set: the vote launches nothing more,
aborts what runs, and each choice votes over the samples that finished, or, where none
had, over the partial ones (server.parallel). The samples run with final-only output, so
running samples' progress is read from the engine (server.engine.engine.Engine.generated_tokens)
every POLL_S: the count can pass the limit by what the running samples decode in one
poll, which `usage` reports exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from server.samples import SampleGroup

# How often running samples' tokens are counted: a few engine steps.
POLL_S = 0.05


class TokenBudget:
    """One request's budget, shared by its prompts' sample groups. `limit=None`: none.
    `most` is the most tokens the request can generate at all (its samples' cap times their
    max_tokens): a budget it cannot reach is not watched, so ordinary requests pay nothing."""

    def __init__(self, engine: Any, limit: int | None, most: int | None = None):
        self.engine = engine
        self.limit = limit if limit is None or most is None or most > limit else None
        self.exhausted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._groups: list[SampleGroup] = []
        self._watcher = asyncio.ensure_future(self._watch()) if self.limit is not None else None

    def watch(self, group: SampleGroup) -> None:
        if self.limit is not None:
            self._groups.append(group)

    def used(self) -> int:
        """Tokens generated so far by the watched groups' samples, finished or running."""
        return sum(group.tokens_generated() for group in self._groups)

    def check(self) -> None:
        """Mark the budget exhausted if the count has reached the limit."""
        if self.limit is not None and not self.exhausted.done() and self.used() >= self.limit:
            self.exhausted.set_result(None)

    async def _watch(self) -> None:
        while not self.exhausted.done():
            await asyncio.sleep(POLL_S)
            self.check()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
