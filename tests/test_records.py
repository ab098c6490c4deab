import math

import pytest

from legion_swarm.dht.records import ConfigRecord, Hardware, Lease, LeaseRecord, parse_record
from legion_swarm.errors import RecordError
from tests.helpers.records import make_record


def test_round_trip() -> None:
    wire = make_record(step=3, loss=1.5, tokens_per_s=10, group="g1")
    parsed = parse_record(wire)
    assert parsed.to_wire() == wire
    assert parsed.hardware == Hardware(cpus=2, ram_gb=3.5, gpu=None)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert parse_record(make_record(future_field=[1, 2])).peer_id == "QmPeer"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"kind": "expert"}, "unknown record kind"),
        ({"peer_id": 5}, "peer_id"),
        ({"addrs": "one"}, "addrs"),
        ({"addrs": ["x"] * 33}, "at most 32"),
        ({"step": True}, "step"),
        ({"loss": math.nan}, "not finite"),
        ({"sent_at": math.inf}, "not finite"),
        ({"state": "zombie"}, "unknown state"),
        ({"hardware": {"cpus": "2", "ram_gb": 1}}, "cpus"),
        ({"hardware": {"ram_gb": 1}}, "missing field 'cpus'"),
    ],
)
def test_off_schema_records_are_rejected(changes: dict, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        parse_record(make_record(**changes))


def test_missing_required_field() -> None:
    wire = make_record()
    del wire["version"]
    with pytest.raises(RecordError, match="missing field 'version'"):
        parse_record(wire)


@pytest.mark.parametrize("junk", [None, 1, "x", [1], {"kind": None}])
def test_non_records(junk: object) -> None:
    with pytest.raises(RecordError):
        parse_record(junk)


def test_data_endpoint_round_trips_and_is_optional() -> None:
    parsed = parse_record(make_record(data=["10.0.0.5", 4242]))
    assert parsed.data == ("10.0.0.5", 4242)
    assert parsed.to_wire()["data"] == ["10.0.0.5", 4242]
    legacy = make_record()
    del legacy["data"]  # records of peers from before the data plane
    assert parse_record(legacy).data is None


@pytest.mark.parametrize("data", [["10.0.0.5"], ["10.0.0.5", 0], ["10.0.0.5", 70000], [5, 4242], ["x" * 65, 1], "ip"])
def test_bad_data_endpoint_is_refused(data: object) -> None:
    with pytest.raises(RecordError, match="data"):
        parse_record(make_record(data=data))


def test_advertised_ip_prefers_announced_then_specific_then_seen_addresses() -> None:
    from legion_swarm.peer import advertised_ip

    seen = ["/ip4/127.0.0.1/tcp/1/p2p/Qm", "/ip4/10.1.2.3/tcp/1/p2p/Qm"]
    assert advertised_ip("0.0.0.0", ("/ip4/203.0.113.7/tcp/31337",), seen) == "203.0.113.7"
    assert advertised_ip("192.168.1.4", (), seen) == "192.168.1.4"
    assert advertised_ip("0.0.0.0", (), seen) == "10.1.2.3"
    assert advertised_ip("0.0.0.0", (), seen[:1]) == "127.0.0.1"


def test_progress_fields_round_trip() -> None:
    wire = make_record(round=7, bytes_sent=10, bytes_received=12, mode="diloco")
    assert parse_record(wire).to_wire() == wire


@pytest.mark.parametrize(
    "changes", [{"mode": "async"}, {"bytes_sent": -1}, {"round": -2}, {"bytes_received": 1.5}, {"round": True}]
)
def test_bad_progress_fields_rejected(changes: dict) -> None:
    with pytest.raises(RecordError):
        parse_record(make_record(**changes))


def make_lease(**changes: object) -> dict:
    wire = LeaseRecord(
        swarm="s", peer_id="QmPeer", sent_at=2.0, leases=(Lease(shard=3, since=1.5, position=4),)
    ).to_wire()
    wire.update(changes)
    return wire


def test_lease_record_round_trip() -> None:
    wire = make_lease()
    parsed = parse_record(wire)
    assert isinstance(parsed, LeaseRecord)
    assert parsed.leases == (Lease(shard=3, since=1.5, position=4),)
    assert parsed.to_wire() == wire


@pytest.mark.parametrize(
    "leases",
    [
        [[3, 1.5]],
        [[-1, 1.5, 0]],
        [[3, "x", 0]],
        [[3, 1.5, -4]],
        [[3.0, 1.5, 0]],
        [[True, 1.5, 0]],
        [[3, math.inf, 0]],
        "not a list",
        [[i, 1.0, 0] for i in range(2000)],
    ],
)
def test_bad_leases_rejected(leases: object) -> None:
    with pytest.raises(RecordError):
        parse_record(make_lease(leases=leases))


def test_config_record_round_trip_and_types() -> None:
    wire = ConfigRecord(
        swarm="s", peer_id="QmA", sent_at=1.0, creator="QmB", creator_key=b"k", config=b"c", signature=b"s"
    ).to_wire()
    assert parse_record(wire).to_wire() == wire
    with pytest.raises(RecordError):
        parse_record({**wire, "signature": "text, not bytes"})
