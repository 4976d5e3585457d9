"""`t2serve label --server URL [--server URL ...]`: a data set labelled through running t2serve
servers instead of a local engine, so labelling scales with the serving fleet.

Each question is one chat completion (the question as the user turn, the labels' temperature
and max tokens) sent with `t2_explore: true`, which needs an admin key (the servers'
--admin-key) as its Bearer token: the server runs it at N_max samples and, run with
`--record-dir STORE` (the shared label store), writes its traffic record (server/recording.py)
itself. With `explore=False` the requests are ordinary `auto` traffic and only those the
servers' --explore-share draws are explored (the reply's `t2.explored` says which).

The gold answers stay with the client, which writes them into the store as
`gold-<name>.jsonl`, one line per explored request, exactly

    {"request_id": str, "answer": str, "source": str, "problem_id": str, "split": str}

`request_id` is the request's `X-Request-Id`, which the server takes as the record's
`request_id` and echoes back (checked: a server that does not is refused), so gold joins the
records by it; `answer` is the normalised gold answer, `source` the data set, `problem_id`
the question's id, `split` the question's split as `t2serve label` gives it (so a question
labelled both ways falls in one split). <name> is the client's host, process id and start time (UTC). The file is
rewritten whole under a dot-name (which no reader matches), synced, and renamed over the
previous version every PUBLISH_EVERY lines and at the end: a reader sees a complete version,
never a half line; a client killed in between loses at most the lines since the last one
(their records are then gold-free traffic).

Requests go to the least busy server (ties in turn: round robin over equal servers), with
at most `concurrency` in flight over all of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from estimator.label_store import replica_name
from estimator.offline.inputs.problems import Problem

GOLD_PREFIX = "gold-"
GOLD_GLOB = f"{GOLD_PREFIX}*.jsonl"
PUBLISH_EVERY = 16  # gold lines between two publications of the file
REQUEST_ID_HEADER = (
    "X-Request-Id"  # server.requests reads it (offline code reaches the server over HTTP here)
)
REQUEST_TIMEOUT_S = 1800.0  # one explored request: N_max samples on a loaded server


def client_name() -> str:
    """This client run's name in its gold file: host, process id and start time (UTC)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return replica_name(f"{socket.gethostname()}-{os.getpid()}-{stamp}")


def gold_line(request_id: str, problem: Problem) -> dict[str, str]:
    """One gold line: what the reader joins onto the traffic record of `request_id`."""
    return {
        "request_id": request_id,
        "answer": problem.answer,
        "source": problem.source,
        "problem_id": problem.id,
        "split": problem.split,
    }


class GoldFile:
    """A client's gold lines in the store, published whole (temporary name, fsync, rename)."""

    def __init__(self, store: Path, name: str, publish_every: int = PUBLISH_EVERY):
        self.path = Path(store) / f"{GOLD_PREFIX}{name}.jsonl"
        self.publish_every = publish_every
        self.lines: list[str] = []
        self.published = 0  # lines in the file readers see

    def add(self, line: dict[str, str]) -> None:
        self.lines.append(json.dumps(line) + "\n")
        if len(self.lines) - self.published >= self.publish_every:
            self.publish()

    def publish(self) -> None:
        """Replace the file by every line so far (nothing to do when none is new)."""
        if len(self.lines) == self.published:
            return
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "w") as f:
            f.writelines(self.lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.published = len(self.lines)


def read_gold(store: Path) -> dict[str, dict[str, str]]:
    """Every published gold line of a store, by request id."""
    gold = {}
    for path in sorted(Path(store).glob(GOLD_GLOB)):
        for text in path.read_text().splitlines():
            line = json.loads(text)
            gold[line["request_id"]] = line
    return gold


class ServerPool:
    """The servers and the requests each has in flight: `pick` takes the least busy one,
    the one after the last pick first among equals."""

    def __init__(self, urls: Sequence[str]):
        if not urls:
            raise ValueError("no server to label through")
        self.urls = [u.rstrip("/") for u in urls]
        self.busy = [0] * len(self.urls)
        self._next = 0

    def pick(self) -> int:
        order = [(self._next + i) % len(self.urls) for i in range(len(self.urls))]
        chosen = min(order, key=lambda i: self.busy[i])
        self._next = (chosen + 1) % len(self.urls)
        return chosen


@dataclass(frozen=True)
class LabelReply:
    """What one question's request came back with."""

    problem: Problem
    request_id: str
    server: str
    status: str  # "200", another HTTP status, or "transport:<exception>"
    explored: bool = False
    answer: str | None = None  # the vote the client got (explored: the N_max vote)
    votes: dict[str, int] = field(default_factory=dict)  # the vote's count per key
    launched: int = 0  # samples the server launched for it
    n_max: int = 0
    policy: str | None = None  # t2.policy: what ran (explore:n=N_max when explored)

    def right(self, key: str | None) -> bool:
        return key is not None and (key == self.problem.answer or key in self.problem.aliases)

    @property
    def correct(self) -> bool:
        return self.right(self.answer)

    @property
    def right_share(self) -> float:
        """The share of the vote's samples whose key is right (acc@1 of an explored pool)."""
        total = sum(self.votes.values())
        return sum(n for key, n in self.votes.items() if self.right(key)) / total if total else 0.0


def reply_of(problem: Problem, request_id: str, server: str, status: int, body: dict) -> LabelReply:
    if status != 200:
        return LabelReply(problem, request_id, server, str(status))
    t2 = body.get("t2") or {}
    return LabelReply(
        problem,
        request_id,
        server,
        "200",
        explored=bool(t2.get("explored")),
        answer=t2.get("answer"),
        votes=dict(t2.get("votes") or {}),
        launched=int(t2.get("launched", t2.get("samples", 0))),
        n_max=int(t2.get("n_max", 0)),
        policy=t2.get("policy"),
    )


async def label_through_servers(
    problems: Sequence[Problem],
    servers: Sequence[str],
    store: Path,
    *,
    temperature: float,
    max_tokens: int,
    concurrency: int = 8,
    admin_key: str | None = None,
    explore: bool = True,
    gold: GoldFile | None = None,
    on_reply: Callable[[LabelReply], None] | None = None,
    progress: bool = True,
) -> list[LabelReply]:
    """Send every problem through the servers (in order, `concurrency` in flight) and write
    the explored ones' gold into `store` (`gold`: a file to add to, e.g. across calls;
    default a new one). `explore`: force exploration (needs `admin_key`); otherwise the
    servers' share decides. `on_reply` sees each reply as it arrives. Replies in problem order."""
    import httpx
    from tqdm import tqdm

    if explore and not admin_key:
        raise ValueError(
            "labelling through servers sends t2_explore, which needs the servers' admin key: pass "
            "--admin-key (or set T2SERVE_ADMIN_KEYS)"
        )
    if concurrency < 1:
        raise ValueError(f"concurrency {concurrency}: it must be at least 1")
    pool = ServerPool(servers)
    Path(store).mkdir(parents=True, exist_ok=True)
    gold = gold or GoldFile(Path(store), client_name())
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    replies: list[LabelReply | None] = [None] * len(problems)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(problems), desc="label --server", unit="q", disable=not progress)

    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), headers=headers) as http:
        models = await http.get(f"{pool.urls[0]}/v1/models")
        models.raise_for_status()
        model = models.json()["data"][0]["id"]

        async def one(k: int, problem: Problem) -> None:
            async with gate:
                s = pool.pick()
                url, request_id = pool.urls[s], f"label-{uuid.uuid4().hex}"
                body: dict = {
                    "model": model,
                    "messages": [{"role": "user", "content": problem.question}],
                    "temperature": temperature,
                    "max_tokens": max_tokens,
                }
                if explore:
                    body["t2_explore"] = True
                pool.busy[s] += 1
                try:
                    response = await http.post(
                        f"{url}/v1/chat/completions", json=body, headers={REQUEST_ID_HEADER: request_id}
                    )
                except httpx.TransportError as exc:
                    reply = LabelReply(problem, request_id, url, f"transport:{type(exc).__name__}")
                else:
                    ok = response.status_code == 200
                    if ok and response.headers.get(REQUEST_ID_HEADER) != request_id:
                        raise RuntimeError(
                            f"{url} did not echo {REQUEST_ID_HEADER}: its records could not be joined "
                            "to the gold answers (a t2serve without it?)"
                        )
                    reply = reply_of(
                        problem, request_id, url, response.status_code, response.json() if ok else {}
                    )
                finally:
                    pool.busy[s] -= 1
            if reply.explored:
                gold.add(gold_line(request_id, problem))
            replies[k] = reply
            if on_reply is not None:
                on_reply(reply)
            bar.update()

        try:
            await asyncio.gather(*(one(k, p) for k, p in enumerate(problems)))
        finally:
            gold.publish()
            bar.close()
    return [r for r in replies if r is not None]


def summary_table(
    replies: Sequence[LabelReply], gold: Path | None = None, seconds: float | None = None
) -> str:
    """Per server: requests, explored, errors; over all: the N_max vote's accuracy and the
    share of right samples on the explored pools."""
    lines = [f"{'server':<32} {'requests':>8} {'explored':>8} {'errors':>6}"]
    for server in dict.fromkeys(r.server for r in replies):
        mine = [r for r in replies if r.server == server]
        errors = sum(r.status != "200" for r in mine)
        lines.append(f"{server[:32]:<32} {len(mine):>8} {sum(r.explored for r in mine):>8} {errors:>6}")
    explored = [r for r in replies if r.explored]
    errors = Counter(r.status for r in replies if r.status != "200")
    lines.append(
        f"questions {len(replies)}   explored {len(explored)}   errors {dict(errors) or 0}"
        + (f"   time {seconds:.0f} s" if seconds is not None else "")
    )
    if explored:
        n_max = sorted({r.n_max for r in explored})
        accuracy = sum(r.correct for r in explored) / len(explored)
        share = sum(r.right_share for r in explored) / len(explored)
        lines.append(
            f"explored pools: N_max {n_max}   vote accuracy {accuracy:.3f}   right samples {share:.3f}"
        )
    if gold is not None:
        lines.append(f"gold: {gold} ({len(explored)} lines; the records are the servers' --record-dir)")
    return "\n".join(lines)
