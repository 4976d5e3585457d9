"""Traffic records: each explored request's pools (server/exploration.py), appended to the
label store (estimator.label_store) that `t2serve label` writes too.

One record per prompt and choice whose N_max samples all finished (a pool cut by the
deadline or the token budget is not one):

    id, request_id, prompt, choice   "<request id>-p<prompt>-c<choice>", and its parts
    source                           "traffic"
    answers, tokens, samples         every sample's vote key, generated tokens and launch
                                     number (sample i ran with seed + i), in finishing order
    vote                             the answer the client got (the N_max vote)
    n_max, aggregate                 the pool's size; what the samples voted with
    sampling                         temperature, top_p, max_tokens, seed (None: unseeded)
    prediction, gate, margin_scale   what the head made of the prompt's states (None: no head)
    states_captured                  False: the states are NaN (none arrived)
    model                            the model identity, as `t2serve label` records it
    time, replica                    Unix time the request finished; the writing replica
    prompt_text, texts               only with --record-text: the prompt and every sample's
                                     text (finishing order); never written otherwise
and the prompt's `[L, d]` states in the shard's .npz.

Recording never blocks or fails a request: `Recorder.submit` puts the records on a bounded
queue (a full queue drops them) and one background task writes what is queued as one shard
(a write error drops those). Every record is counted once in
`t2serve_label_records_total{outcome="written"|"dropped_full"|"dropped_error"}`. `stop`
flushes the queue (at shutdown, within FLUSH_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from estimator.label_store import ShardAppender
from server import metrics
from server.config import RecordingSettings
from server.result import ThinkingResult
from server.samples import Sample

logger = logging.getLogger(__name__)

SHARD_RECORDS = 64  # most records one shard holds: a writer that fell behind catches up in batches
FLUSH_TIMEOUT_S = 30.0  # at shutdown, how long queued records may take to be written


def model_identity(engine: Any) -> dict[str, Any]:
    """What labels, traffic records and heads record about the model they were made with."""
    info = engine.info
    return {
        "name": info.name,
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "fingerprint": info.fingerprint,
    }


def default_replica() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def complete_pools(result: ThinkingResult) -> list[tuple[int, list[Sample]]]:
    """An explored result's choices whose N_max samples all finished, each with its samples
    in finishing order (a vote cut by the deadline or the token budget has no pool)."""
    if result.timed_out or result.budget_exhausted:
        return []
    pools = []
    for c, choice in enumerate(result.choices):
        by_number = {s.number: s for s in choice.samples}
        order = [by_number[n] for n in result.finish_order[c] if n in by_number]
        if len(order) == result.n_max:
            pools.append((c, order))
    return pools


@dataclass(frozen=True)
class Record:
    """One pool's record and its prompt's states ([L, d] float32)."""

    body: dict[str, Any]
    states: np.ndarray


def traffic_records(
    result: ThinkingResult,
    *,
    request_id: str,
    prompt: int,
    params: Any,
    model: dict[str, Any],
    replica: str,
    shape: tuple[int, int],
    prompt_text: str | None = None,
) -> list[Record]:
    """One prompt's explored result as records, one per complete pool. `shape` is the
    model's (layers, hidden size), for the NaN states of a prompt whose states did not
    arrive; `prompt_text` (with --record-text) is kept with the texts of the samples."""
    estimate = result.estimate
    captured = estimate.states is not None
    states = np.asarray(estimate.states, dtype=np.float32) if captured else np.full(shape, np.nan, np.float32)
    sampling = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "seed": params.seed,
    }
    records = []
    for c, order in complete_pools(result):
        body: dict[str, Any] = {
            "id": f"{request_id}-p{prompt}-c{c}",
            "request_id": request_id,
            "prompt": prompt,
            "choice": c,
            "source": "traffic",
            "answers": [s.answer for s in order],
            "tokens": [s.num_tokens for s in order],
            "samples": [s.number for s in order],
            "vote": result.choices[c].vote.answer,
            "n_max": result.n_max,
            "aggregate": result.aggregate,
            "sampling": sampling,
            "prediction": estimate.prediction,
            "gate": estimate.gate,
            "margin_scale": estimate.margin_scale,
            "states_captured": captured,
            "model": model,
            "time": time.time(),
            "replica": replica,
        }
        if prompt_text is not None:
            body["prompt_text"] = prompt_text
            body["texts"] = [s.text for s in order]
        records.append(Record(body, states))
    return records


class Recorder:
    """The bounded queue and the background writer of one replica's traffic records."""

    def __init__(self, settings: RecordingSettings):
        assert settings.record_dir is not None
        self.store = ShardAppender(Path(settings.record_dir), settings.replica or default_replica())
        self.queue: asyncio.Queue[Record] = asyncio.Queue(maxsize=settings.record_queue)
        self._task: asyncio.Task[None] | None = None

    @property
    def replica(self) -> str:
        return self.store.replica

    def submit(self, records: list[Record]) -> None:
        """Queue records for the writer; what does not fit is dropped (and counted)."""
        for record in records:
            try:
                self.queue.put_nowait(record)
            except asyncio.QueueFull:
                metrics.LABEL_RECORDS.labels("dropped_full").inc()

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._write_forever())

    async def stop(self) -> None:
        """Write what is queued (within FLUSH_TIMEOUT_S: the rest is dropped), then stop."""
        try:
            await asyncio.wait_for(self.queue.join(), FLUSH_TIMEOUT_S)
        except TimeoutError:
            left = self.queue.qsize()
            logger.warning("traffic records: %d not written by shutdown, dropped", left)
            metrics.LABEL_RECORDS.labels("dropped_error").inc(left)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _write_forever(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < SHARD_RECORDS and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await asyncio.to_thread(self._write, batch)
            finally:
                for _ in batch:
                    self.queue.task_done()

    def _write(self, batch: list[Record]) -> None:
        try:
            self.store.append([r.body for r in batch], np.stack([r.states for r in batch]))
        except Exception:
            logger.warning("traffic records: a shard of %d could not be written", len(batch), exc_info=True)
            metrics.LABEL_RECORDS.labels("dropped_error").inc(len(batch))
            return
        metrics.LABEL_RECORDS.labels("written").inc(len(batch))
