"""The response store's rules (server/response_store.py), on a clock the tests move: room is
held before a request runs, an explicit `store: true` that cannot be met is a 400 naming
`store`, a left-out `store` is skipped when full, expired entries are freed first, and every
miss says why."""

from __future__ import annotations

import pytest

from server.config import ResponsesSettings
from server.errors import APIError
from server.response_store import ResponseStore
from tests.server.helpers import metric

RESPONSE = {"id": "resp_a", "object": "response"}
TRANSCRIPT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store_of(size: int = 2, ttl_s: float = 60.0, enabled: bool = True) -> tuple[ResponseStore, Clock]:
    clock = Clock()
    settings = ResponsesSettings(store=enabled, response_store_size=size, response_store_ttl_s=ttl_s)
    return ResponseStore(settings, clock=clock), clock


def stored(store: ResponseStore, response_id: str, asked: bool | None = None) -> None:
    assert store.reserve(response_id, asked)
    store.put(response_id, {**RESPONSE, "id": response_id}, TRANSCRIPT)


def refusal(call, *args) -> APIError:
    with pytest.raises(APIError) as err:
        call(*args)
    return err.value


def test_a_stored_response_is_read_continued_and_deleted():
    store, _ = store_of()
    stored(store, "resp_a")
    assert store.response("resp_a")["id"] == "resp_a"
    transcript = store.transcript("resp_a")
    transcript.append({"role": "user", "content": "more"})  # a continuation's copy
    assert store.transcript("resp_a") == TRANSCRIPT
    store.delete("resp_a")
    assert len(store) == 0
    error = refusal(store.transcript, "resp_a")
    assert (error.status, error.param) == (400, "previous_response_id") and "deleted" in error.message
    assert refusal(store.response, "resp_a").status == 404
    assert refusal(store.delete, "resp_a").status == 404


def test_store_false_is_never_stored_and_left_out_is_stored_when_there_is_room():
    store, _ = store_of(size=1)
    assert not store.reserve("resp_a", False)
    assert len(store) == 0
    skipped = metric("t2serve_response_store_total", outcome="skipped_full")
    assert store.reserve("resp_b", None)
    assert not store.reserve("resp_c", None)  # full: not stored, the response says store=false
    assert metric("t2serve_response_store_total", outcome="skipped_full") == skipped + 1


def test_explicit_store_on_a_full_store_is_a_400_naming_store_until_entries_expire():
    store, clock = store_of(size=1, ttl_s=60)
    stored(store, "resp_a")
    error = refusal(store.reserve, "resp_b", True)
    assert (error.status, error.param) == (400, "store") and "full" in error.message
    clock.now += 61  # resp_a expires: the full store frees it first
    assert store.reserve("resp_b", True)
    error = refusal(store.transcript, "resp_a")
    assert error.param == "previous_response_id" and "expired" in error.message


def test_room_held_for_a_failed_request_is_given_back():
    store, _ = store_of(size=1)
    assert store.reserve("resp_a", True)
    assert "not finished" in refusal(store.transcript, "resp_a").message
    assert refusal(store.response, "resp_a").status == 404
    store.release("resp_a")
    assert store.reserve("resp_b", True)
    store.put("resp_b", RESPONSE, TRANSCRIPT)
    store.release("resp_b")  # a finished response stays
    assert store.response("resp_b") == RESPONSE


def test_an_expired_entry_is_gone_when_read():
    store, clock = store_of(ttl_s=10)
    stored(store, "resp_a")
    clock.now += 10
    error = refusal(store.response, "resp_a")
    assert error.status == 404 and "expired" in error.message


def test_with_the_store_off_store_true_is_a_400_and_every_id_is_unknown():
    store, _ = store_of(enabled=False)
    error = refusal(store.reserve, "resp_a", True)
    assert (error.status, error.param) == (400, "store") and "--no-store" in error.message
    assert not store.reserve("resp_a", None)
    error = refusal(store.transcript, "resp_a")
    assert error.param == "previous_response_id" and "--no-store" in error.message


def test_an_unknown_id_says_so():
    store, _ = store_of()
    assert "not found" in refusal(store.transcript, "resp_x").message
