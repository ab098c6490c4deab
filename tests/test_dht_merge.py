"""Readers merge successive DHT reads: nothing unexpired is forgotten, newer writes win."""

from dataclasses import replace

from legion_swarm.dht.node import Found, merge_records
from legion_swarm.dht.records import parse_record
from tests.helpers.records import make_record


def found(owner: str, expires_at: float, **changes: object) -> Found:
    return Found(parse_record(make_record(peer_id=owner, **changes)), expires_at)


def test_a_partial_read_does_not_drop_unexpired_records() -> None:
    seen = {"a": found("a", 110), "b": found("b", 112)}
    fresh = {"a": found("a", 115)}  # b's replicas did not answer this time
    merged = merge_records(seen, fresh, now=100)
    assert set(merged) == {"a", "b"}
    assert merged["a"].expires_at == 115


def test_expired_records_are_dropped_from_both_sides() -> None:
    seen = {"a": found("a", 99), "b": found("b", 105)}
    fresh = {"c": found("c", 100), "d": found("d", 130)}
    assert set(merge_records(seen, fresh, now=100)) == {"b", "d"}


def test_the_record_expiring_last_wins_whichever_read_had_it() -> None:
    newer_left = found("a", 120, state="left")
    older_alive = found("a", 110)
    assert merge_records({"a": newer_left}, {"a": older_alive}, now=100)["a"].record.state == "left"
    assert merge_records({"a": older_alive}, {"a": newer_left}, now=100)["a"].record.state == "left"
    stepped = replace(older_alive, expires_at=125)
    assert merge_records({"a": newer_left}, {"a": stepped}, now=100)["a"].expires_at == 125
