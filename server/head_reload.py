"""Hot reload of the estimator head and the policy: `POST /admin/head`, `POST /admin/policy`
(an admin key), SIGHUP and --reload-watch (server/reload_watch.py) swap the T2 head, with the
stopping table and gate saved beside it, and the policy `auto` runs, in a running server
without dropping a request.

The head loads off the event loop and is checked against the served model before anything
changes; a head that cannot be used (unreadable, for another model or hidden size, one
--policy cannot run with, or capture off) is refused with the reason and the old head
stays. The swap is one assignment (`ParallelThinker.current`), and each request's plan keeps
the head it was resolved with (`Plan.head`): a request that read its estimate with the old
head finishes with it. SIGHUP reloads the --estimator-head the server started with (the
files at that path may have been replaced).

A head's version is a short hash of its files' contents and the time it was loaded,
`<12 hex>@<UTC time>`; `/v1/models` (`t2_head`), every response's `t2.head` and
`t2serve_estimator_info{version}` show it.

The policy (a spec, or @PATH: the "policy" of `t2serve tune`'s JSON) is checked as --policy is
at start-up, with the head it will run with; a bad one is refused (the old one stays). It is
part of the head in use (`HeadInUse.policy`, `default_policy`), so a head and a policy given
together swap in the same assignment: a tuned `t2+learned` that needs the new head's stopping
table never runs with the old head. `/v1/models` (`t2_policy`) and every `auto` response's
`t2.policy` show it. SIGHUP re-reads --estimator-head and --policy @PATH together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

from estimator.gate import gate_path
from estimator.head import DEFAULT_HEAD, load_head
from estimator.learned_stopping import table_path
from estimator.policy_spec import describe, spec_from_flag
from server import metrics
from server.parallel import HeadInUse, ParallelThinker
from server.protocol import HeadCard, PolicyCard

logger = logging.getLogger(__name__)


class HeadRefused(ValueError):
    """A head that cannot be used; the message says why."""


class PolicyRefused(HeadRefused):
    """A policy that cannot be used (unreadable, invalid, or not with the head); the message
    says why."""


def _stamp(loaded_at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(loaded_at))


def head_path(spec: str) -> Path:
    """A head spec's path without a suffix ('default': the shipped head)."""
    path = DEFAULT_HEAD if spec == "default" else Path(spec)
    return path.with_suffix("") if path.suffix in {".json", ".safetensors"} else path


def head_version(path: Path, loaded_at: float) -> str:
    """`<hash>@<time>`: the first 12 hex digits of a SHA-256 over the head's files (probes,
    meta, stopping table, gate; those present; a copy under another name hashes the same),
    and the load time in UTC."""
    digest = hashlib.sha256()
    for file in (
        path.with_suffix(".json"),
        path.with_suffix(".safetensors"),
        table_path(path),
        gate_path(path),
    ):
        if file.is_file():
            role = file.name.removeprefix(path.name)  # .json, .stopping.safetensors: not the head's name
            digest.update(role.encode() + b"\0" + file.read_bytes())
    return f"{digest.hexdigest()[:12]}@{_stamp(loaded_at)}"


def policy_version(spec: str, loaded_at: float) -> str:
    """`<hash>@<time>`: the first 12 hex digits of a SHA-256 over the spec, and the load time."""
    return f"{hashlib.sha256(spec.encode()).hexdigest()[:12]}@{_stamp(loaded_at)}"


def read_policy(value: str) -> tuple[str, str]:
    """A policy as asked for (a spec, or @PATH) read: its spec and version; PolicyRefused when
    the file cannot be read. Blocking (a file read); whether the spec is valid is for
    ParallelThinker.bind, with the head."""
    try:
        spec = spec_from_flag(value)
    except ValueError as exc:
        raise PolicyRefused(str(exc)) from exc
    return spec, policy_version(spec, time.time())


def load(spec: str, engine: Any) -> tuple[Any, str]:
    """The head at `spec` checked against the engine's model, and its version; HeadRefused
    with the reason when it cannot be used. Blocking: file reads and torch."""
    if not engine.settings.capture:
        raise HeadRefused("hidden-state capture is off (--no-capture): a head would have no states to read")
    path = head_path(spec)
    info = engine.info
    try:
        head = load_head(
            str(path),
            name=info.name,
            num_layers=info.num_layers,
            hidden_size=info.hidden_size,
            fingerprint=info.fingerprint,
        )
    except Exception as exc:  # unreadable files fail in json, safetensors or torch alike
        raise HeadRefused(f"estimator head {spec} cannot be used: {exc}") from exc
    assert head is not None  # a path always gives a head or an error
    return head, head_version(path, time.time())


def publish(using: HeadInUse, spec: str | None) -> None:
    """The head in use in `t2serve_estimator_info` (one place for it)."""
    head = using.head
    metrics.ESTIMATOR_INFO.info(
        {
            "identity": head.identity if head is not None else "",
            "n_max": str(using.n_max),
            "layers": ",".join(map(str, head.meta.layers)) if head is not None else "",
            "margin": f"{using.margin:g}" if head is not None else "",
            "version": using.version or "",
            "spec": spec or "",
            "policy": describe(using.default_policy),
        }
    )


class HeadReloader:
    """Swaps the thinker's head and policy; one reload at a time, in the order they were asked for."""

    def __init__(self, thinker: ParallelThinker, engine: Any, spec: str | None, start_spec: str | None):
        self.thinker = thinker
        self.engine = engine
        self.spec = spec  # the head in use's spec (None: no head)
        self.start_spec = start_spec  # --estimator-head: what SIGHUP reloads
        settings = thinker.settings
        # --policy @PATH: what SIGHUP re-reads (None: a spec, nothing to re-read)
        self.start_policy = f"@{settings.policy_file}" if settings.policy_file else None
        self.policy_spec = self.start_policy or settings.policy  # the policy in use, as asked for
        self.policy_version = policy_version(thinker.current.policy, time.time())
        self._lock = asyncio.Lock()
        self._signalled: set[asyncio.Task[None]] = set()

    def card(self) -> HeadCard | None:
        using = self.thinker.current
        head = using.head
        if head is None or using.version is None or self.spec is None:
            return None
        return HeadCard(
            version=using.version,
            spec=self.spec,
            identity=head.identity,
            n_max=using.n_max,
            margin=using.margin,
            stopping=head.stopping is not None,
            gate=head.gate is not None,
        )

    def policy_card(self) -> PolicyCard:
        return PolicyCard(
            policy=describe(self.thinker.current.default_policy),
            spec=self.policy_spec,
            version=self.policy_version,
        )

    async def reload(
        self,
        spec: str | None,
        margin: float | None = None,
        source: str = "api",
        policy: str | None = None,
    ) -> HeadCard | None:
        """Load the head at `spec` and/or the policy `policy` (None: keep the one in use) off
        the event loop, check them together and swap them in; HeadRefused / PolicyRefused
        (the old ones stay) when they cannot be used. Returns the head's card."""
        async with self._lock:
            current = self.thinker.current
            try:
                if spec is None:  # the policy alone: the head in use, at its margin
                    head, version = current.head, current.version
                    margin = current.margin if margin is None else margin
                else:
                    head, version = await asyncio.to_thread(load, spec, self.engine)
                read = await asyncio.to_thread(read_policy, policy) if policy is not None else None
                try:
                    using = self.thinker.bind(head, version, margin, read[0] if read else None)
                except ValueError as exc:
                    if read is not None:
                        raise PolicyRefused(f"policy {read[0]}: {exc}") from exc
                    raise HeadRefused(
                        f"the policy in use ({current.policy}) cannot run with it: {exc}"
                    ) from exc
            except HeadRefused as exc:
                metrics.HEAD_RELOADS.labels(source, "refused").inc()
                logger.warning("reload (%s) refused, the head and policy in use stay: %s", source, exc)
                raise
            # One assignment, nothing awaited before it: requests planned from here on run with it.
            self.thinker.current, self.spec, self.policy_spec, self.policy_version = (
                using,
                self.spec if spec is None else spec,
                self.policy_spec if policy is None else policy,
                self.policy_version if read is None else read[1],
            )
            publish(using, self.spec)
            metrics.HEAD_RELOADS.labels(source, "ok").inc()
            logger.info(
                "reloaded (%s): head %s, version %s, T2 margin %g; policy %s",
                source,
                self.spec,
                using.version,
                using.margin,
                describe(using.default_policy),
            )
            return self.card()

    def on_sighup(self) -> None:
        """SIGHUP: reload --estimator-head and --policy @PATH in the background (a refusal is
        logged and counted)."""
        if self.start_spec is None and self.start_policy is None:
            logger.warning("SIGHUP: no --estimator-head or --policy @PATH to reload")
            return
        task = asyncio.ensure_future(self._reload_quietly(self.start_spec, self.start_policy))
        self._signalled.add(task)  # held until done, so it is not collected while it runs
        task.add_done_callback(self._signalled.discard)

    async def _reload_quietly(self, spec: str | None, policy: str | None) -> None:
        with contextlib.suppress(HeadRefused):  # reload() logged and counted it
            await self.reload(spec, source="sighup", policy=policy)

    def listen(self) -> None:
        """Reload on SIGHUP (the process's own server only: the handler is process-wide)."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.on_sighup)

    def stop_listening(self) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
