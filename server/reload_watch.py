"""--reload-watch FILE: every replica reloads the head and policy a retrain job publishes.

Replicas behind a Service cannot all be reached by one POST, and a pod started after a
retrain must not come up with the old head. So the job (deploy/k8s/retrain-cronjob.yaml)
writes its outputs under a new folder on the shared label volume, then replaces one small
JSON file there by a rename:

    {"head": "versions/20261206T1800Z/head",              a head path, or "default"
     "policy": "@versions/20261206T1800Z/tuned.json",     a spec, or @PATH (tune's JSON)
     "margin": 1.4}                                       optional; every key is

(relative paths are read from the file's folder). Each server reads it at start-up, then
looks at it every --reload-watch-interval seconds and, when its bytes changed, reloads what
it names through the same path as `POST /admin/head` (server.head_reload; counted as
t2serve_head_reloads_total{source="watch"}). A file that cannot be used is logged, counted
and remembered: the server keeps what it serves until the file changes again. A missing
file changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from server import metrics
from server.head_reload import HeadRefused, HeadReloader

logger = logging.getLogger(__name__)

SOURCE = "watch"


def reload_request(text: bytes, folder: Path) -> dict[str, Any]:
    """The file's reload as `HeadReloader.reload` arguments (spec, policy, margin), paths
    resolved against `folder`; ValueError when it is no such file."""
    body = json.loads(text)
    if (
        not isinstance(body, dict)
        or not body.keys() & {"head", "policy"}
        or body.keys() - {"head", "policy", "margin"}
    ):
        raise ValueError('a JSON object with "head" and/or "policy" (and optionally "margin")')
    head, policy, margin = body.get("head"), body.get("policy"), body.get("margin")
    if not all(v is None or isinstance(v, str) for v in (head, policy)) or not (
        margin is None or (isinstance(margin, int | float) and margin > 0)
    ):
        raise ValueError('"head" and "policy" are strings, "margin" a positive number')
    if head is not None and head != "default":
        head = str(folder / head)  # an absolute path stays as it is
    if policy is not None and policy.startswith("@"):
        policy = "@" + str(folder / policy[1:])
    return {"spec": head, "policy": policy, "margin": margin}


class ReloadWatch:
    """Polls one file and reloads what it names whenever its bytes change."""

    def __init__(self, reloader: HeadReloader, path: Path, interval_s: float):
        self.reloader = reloader
        self.path = Path(path)
        self.interval_s = interval_s
        self.seen: bytes | None = None  # the bytes last acted on (applied or refused)
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> bool:
        """Reload if the file changed since the last look; True when a reload was applied."""
        try:
            text = await asyncio.to_thread(self.path.read_bytes)
        except FileNotFoundError:
            return False
        except OSError:
            logger.warning("--reload-watch %s cannot be read", self.path, exc_info=True)
            return False
        if text == self.seen:
            return False
        self.seen = text
        try:
            request = reload_request(text, self.path.parent)
        except ValueError as exc:  # json.JSONDecodeError is one
            metrics.HEAD_RELOADS.labels(SOURCE, "refused").inc()
            logger.warning("--reload-watch %s is not a reload, nothing changes: %s", self.path, exc)
            return False
        try:
            await self.reloader.reload(
                request["spec"], request["margin"], source=SOURCE, policy=request["policy"]
            )
        except HeadRefused:
            return False  # reload() logged and counted it
        return True

    async def start(self) -> None:
        """Apply the file as it is now, then keep watching it in the background."""
        await self.check()
        self._task = asyncio.ensure_future(self._watch_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # never let the watch die: the next look may succeed
                logger.warning("--reload-watch %s: the reload failed", self.path, exc_info=True)
