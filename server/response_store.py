"""The response store behind /v1/responses' `store`, GET and DELETE /v1/responses/{id} and
`previous_response_id`: bounded (--response-store-size), each entry kept
--response-store-ttl-s, in this process's memory (a continuation must reach the replica that
stored its previous response).

An entry holds the Response JSON as GET returns it and the turn's whole transcript: the chat
messages the turn rendered and the winner's assistant message, its tool calls included, so a
continuation renders every earlier call and result.

Room is held for a response when its request is prepared, before it waits for admission, so
whether it is stored is decided before it runs: an explicit `store: true` that cannot be met
is a 400 naming `store`; a request that leaves `store` out is stored when there is room, else
not, and its response says `store: false`. A full store frees its expired entries first.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server import metrics
from server.config import ResponsesSettings
from server.errors import APIError


@dataclass
class StoredResponse:
    expires: float  # on the store's clock
    response: dict[str, Any] | None = None  # None: room held for a response still running
    transcript: list[dict[str, Any]] = field(default_factory=list)


class ResponseStore:
    def __init__(self, settings: ResponsesSettings, clock: Callable[[], float] = time.monotonic):
        self.enabled = settings.store
        self.size = settings.response_store_size
        self.ttl_s = settings.response_store_ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        # Ids no longer held and why ("expired", "deleted"), as many as the store holds, so a
        # miss can say which.
        self._gone: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def reserve(self, response_id: str, asked: bool | None) -> bool:
        """Hold room for `response_id` if it is to be stored: `asked` is the request's
        `store` (None: left out). True when it will be stored."""
        if asked is False:
            return False
        if not self.enabled:
            if asked:
                metrics.RESPONSE_STORE.labels("refused_off").inc()
                raise APIError(
                    400,
                    "store: this server keeps no responses (started with --no-store); send store: false",
                    param="store",
                    code="unsupported_parameter",
                )
            return False
        self._free_expired()
        if len(self._entries) >= self.size:
            if asked:
                metrics.RESPONSE_STORE.labels("refused_full").inc()
                raise APIError(
                    400,
                    f"store: the response store is full ({self.size} responses, each kept "
                    f"{self.ttl_s:g} s); send store: false, delete stored responses, or retry later",
                    param="store",
                    code="store_full",
                )
            metrics.RESPONSE_STORE.labels("skipped_full").inc()
            return False
        self._entries[response_id] = StoredResponse(expires=self.clock() + self.ttl_s)
        return True

    def release(self, response_id: str) -> None:
        """Give back room held for a response that was not stored (it failed or was cancelled)."""
        entry = self._entries.get(response_id)
        if entry is not None and entry.response is None:
            del self._entries[response_id]

    def put(self, response_id: str, response: dict[str, Any], transcript: list[dict[str, Any]]) -> None:
        """Store a finished response in the room held for it."""
        self._entries[response_id] = StoredResponse(self.clock() + self.ttl_s, response, transcript)
        metrics.RESPONSE_STORE.labels("stored").inc()

    def transcript(self, response_id: str) -> list[dict[str, Any]]:
        """The transcript `previous_response_id` continues (a copy); 400 naming
        previous_response_id saying why there is none."""
        entry = self._find(response_id)
        if isinstance(entry, str):
            metrics.RESPONSE_STORE.labels("previous_missing").inc()
            raise APIError(400, f"previous_response_id: {entry}", param="previous_response_id")
        return copy.deepcopy(entry.transcript)

    def response(self, response_id: str) -> dict[str, Any]:
        """A stored Response JSON; 404 saying why there is none."""
        entry = self._find(response_id)
        if isinstance(entry, str):
            raise APIError(404, entry, param="response_id", code="not_found")
        assert entry.response is not None
        return entry.response

    def delete(self, response_id: str) -> None:
        """Forget a stored response; 404 saying why there is none."""
        self.response(response_id)
        del self._entries[response_id]
        self._forget(response_id, "deleted")

    def _find(self, response_id: str) -> StoredResponse | str:
        """The finished entry, or why there is none."""
        if not self.enabled:
            return f"response '{response_id}' not found: this server keeps no responses (--no-store)"
        entry = self._entries.get(response_id)
        if entry is not None and entry.expires <= self.clock():
            del self._entries[response_id]
            self._forget(response_id, "expired")
            entry = None
        if entry is None:
            why = self._gone.get(response_id)
            if why == "expired":
                return f"response '{response_id}' has expired (responses are kept {self.ttl_s:g} s)"
            if why == "deleted":
                return f"response '{response_id}' was deleted"
            return f"response '{response_id}' not found (never stored here, or stored with store: false)"
        if entry.response is None:
            return f"response '{response_id}' has not finished yet"
        return entry

    def _free_expired(self) -> None:
        now = self.clock()
        for response_id in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[response_id]
            self._forget(response_id, "expired")

    def _forget(self, response_id: str, why: str) -> None:
        metrics.RESPONSE_STORE.labels(why).inc()
        self._gone[response_id] = why
        while len(self._gone) > self.size:
            self._gone.popitem(last=False)
