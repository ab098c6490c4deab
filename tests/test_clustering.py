"""Latency-based grouping: the pure core (RTT matrix completion, size-constrained clustering), no network."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from legion_swarm.errors import ConfigError
from legion_swarm.groups import clustering
from legion_swarm.groups.clustering import (
    NO_MEASUREMENT_RTT_MS,
    RttMatrix,
    default_merge_limit,
    form_groups,
    intra_group_rtt,
)

pytestmark = pytest.mark.timeout(120)

Measurements = dict[str, dict[str, float]]


def peer_ids(n: int, rng: np.random.Generator) -> list[str]:
    """Random-looking ids, so that sorted order interleaves regions instead of following them."""
    ids: set[str] = set()
    while len(ids) < n:
        ids.add(f"Qm{int(rng.integers(0, 2**48)):012x}")
    return sorted(ids)


def planted(
    regions: int, per_region: int, seed: int, *, sample: float = 1.0
) -> tuple[list[str], dict[str, int], Measurements]:
    """Peers in ``regions`` regions: ~5 ms inside a region, 80–150 ms across, each direction with its own noise.

    With ``sample`` < 1 every peer measures only that fraction of the others (a different random subset each).
    """
    rng = np.random.default_rng(seed)
    ids = list(peer_ids(regions * per_region, rng))
    rng.shuffle(ids)
    region = {p: i // per_region for i, p in enumerate(ids)}
    base = rng.uniform(80, 150, size=(regions, regions))
    base = (base + base.T) / 2
    np.fill_diagonal(base, 5.0)
    measurements: Measurements = {}
    for p in ids:
        others = [q for q in ids if q != p]
        k = max(1, round(sample * len(others)))
        chosen = rng.choice(len(others), size=k, replace=False)
        measurements[p] = {others[j]: float(base[region[p], region[others[j]]] + rng.uniform(-1, 1)) for j in chosen}
    return ids, region, measurements


def regions_of(region: dict[str, int]) -> set[frozenset[str]]:
    by: dict[int, set[str]] = {}
    for p, r in region.items():
        by.setdefault(r, set()).add(p)
    return {frozenset(v) for v in by.values()}


def as_partition(groups: tuple[tuple[str, ...], ...]) -> set[frozenset[str]]:
    return {frozenset(g) for g in groups}


def random_matrix(n: int, seed: int, *, integer: bool = False) -> RttMatrix:
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 6, size=(n, n)).astype(float) if integer else rng.uniform(1, 200, size=(n, n))
    x = np.maximum(x, x.T)
    np.fill_diagonal(x, 0)
    return RttMatrix.from_dense(peer_ids(n, rng), x)


def feasible(n: int, lo: int, hi: int) -> bool:
    return any(k * lo <= n <= k * hi for k in range(1, n + 1))


def check_groups(groups: tuple[tuple[str, ...], ...], peers: list[str], lo: int, hi: int) -> None:
    flat = [p for g in groups for p in g]
    assert sorted(flat) == sorted(peers)  # every peer exactly once
    assert all(list(g) == sorted(g) and g for g in groups)
    assert list(groups) == sorted(groups)
    n = len(peers)
    if 0 < n < lo:
        assert len(groups) == 1
    else:
        assert all(len(g) <= hi for g in groups)
        if feasible(n, lo, hi):
            assert all(len(g) >= lo for g in groups), [len(g) for g in groups]


# --- the RTT matrix ---------------------------------------------------------------------------------------------


def test_matrix_symmetrises_with_max_ignores_garbage_and_estimates_missing_pairs() -> None:
    m = RttMatrix.from_measurements(
        {
            "b": {"a": 10.0, "c": float("nan"), "b": 3.0, "zz": 1.0},  # NaN, self and a stranger ignored
            "a": {"b": 14.0, "c": 5.0, "d": -1.0},  # -1 ignored: d stays unmeasured
            "c": {"x": float("inf")},
        },
        peers=["d", "c", "b", "a"],
    )
    assert m.peers == ("a", "b", "c", "d")
    assert m.rtt("a", "b") == m.rtt("b", "a") == 14.0  # the slower direction wins
    assert m.rtt("a", "c") == 5.0  # one side measured: its value
    assert m.rtt("b", "c") == 19.0  # unmeasured: b-a-c relay path
    assert m.rtt("a", "d") == m.rtt("c", "d") == 28.0  # unreachable: twice the largest measurement
    assert m.measured.tolist() == [
        [True, True, True, False],
        [True, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]
    assert not m.ms.flags.writeable and not m.measured.flags.writeable
    with pytest.raises(KeyError):
        m.rtt("a", "nobody")


def test_matrix_relay_estimates_are_capped_and_respect_max_hops() -> None:
    chain = {"a": {"b": 10.0}, "b": {"c": 10.0}, "c": {"d": 10.0}, "d": {"e": 1.0}}
    full = RttMatrix.from_measurements(chain)
    assert full.rtt("a", "c") == 20.0 and full.rtt("a", "d") == 20.0  # 30 ms path capped at 2 × 10
    short = RttMatrix.from_measurements(chain, max_hops=2)
    assert short.rtt("a", "c") == 20.0 and short.rtt("b", "e") == 20.0 and short.rtt("c", "e") == 11.0
    one = RttMatrix.from_measurements(chain, max_hops=1)
    assert one.rtt("a", "c") == 20.0 and one.rtt("c", "e") == 20.0  # no relays: every unmeasured pair is the cap
    empty = RttMatrix.from_measurements({}, peers=["x", "y"])
    assert empty.rtt("x", "y") == NO_MEASUREMENT_RTT_MS


def test_unmeasured_pair_takes_the_triangle_lower_bound_only_with_enough_witnesses() -> None:
    # a and b never measured each other; both see witnesses w1..w4 at nearly the same RTTs: same place.
    a_row = {"w1": 100.0, "w2": 102.0, "w3": 50.0, "w4": 70.0}
    b_row = {"w1": 101.0, "w2": 100.0, "w3": 52.0, "w4": 71.0}
    m = RttMatrix.from_measurements({"a": a_row, "b": b_row})
    assert clustering.MIN_WITNESSES == 4 and m.rtt("a", "b") == 2.0 and not m.measured[0, 1]
    del a_row["w4"]  # three witnesses: the relay path a-w3-b (102 ms) stands
    assert RttMatrix.from_measurements({"a": a_row, "b": b_row}).rtt("a", "b") == 102.0


def naive_shortest_paths(direct: list[list[float]], max_hops: int) -> list[list[float]]:
    """Shortest walk of at most max_hops measured links, extended by its last link (the real one extends the first)."""
    n = len(direct)
    best = [row[:] for row in direct]  # diagonal 0: "at most h links" includes shorter walks
    for _ in range(max_hops - 1):
        links = [[k for k in range(n) if math.isfinite(direct[k][j])] for j in range(n)]
        best = [[min([best[i][j]] + [best[i][k] + direct[k][j] for k in links[j]]) for j in range(n)] for i in range(n)]
    return best


@pytest.mark.parametrize("seed", range(12))
def test_matrix_estimates_match_naive_triangle_bounds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 13))
    density = rng.uniform(0.15, 0.6)  # dense enough, often, for 4 witnesses
    ids = peer_ids(n, rng)
    measurements: Measurements = {p: {} for p in ids}
    for i, j in itertools.permutations(range(n), 2):
        if rng.random() < density:
            measurements[ids[i]][ids[j]] = float(rng.integers(1, 50))  # integers: sums are exact
    for hops in (1, 2, 3, 5):
        m = RttMatrix.from_measurements(measurements, max_hops=hops)
        both = np.full((n, n), -math.inf)
        for p, row in measurements.items():
            for q, v in row.items():
                both[ids.index(p), ids.index(q)] = v
        both = np.maximum(both, both.T)
        direct = np.where(both >= 0, both, math.inf)
        np.fill_diagonal(direct, 0.0)
        finite = direct[np.isfinite(direct) & ~np.eye(n, dtype=bool)]
        cap = 2 * finite.max() if finite.size and finite.max() > 0 else NO_MEASUREMENT_RTT_MS
        expected = np.minimum(np.array(naive_shortest_paths(direct.tolist(), hops)), cap)
        for i, j in itertools.permutations(range(n), 2):
            witnesses = [k for k in range(n) if k not in (i, j) and np.isfinite(direct[i, k] + direct[j, k])]
            if len(witnesses) >= clustering.MIN_WITNESSES:
                bound = max(abs(direct[i, k] - direct[j, k]) for k in witnesses)
                expected[i, j] = min(expected[i, j], bound)
        expected = np.where(np.isfinite(direct), direct, expected)
        assert np.array_equal(m.ms, expected), (hops, m.ms, expected)
        assert np.array_equal(m.measured, np.isfinite(direct))


def test_sparse_estimates_keep_regions_apart() -> None:
    ids, region, measurements = planted(4, 6, seed=3, sample=0.3)
    m = RttMatrix.from_measurements(measurements)
    n = len(ids)
    r = np.array([region[p] for p in m.peers])
    same = r[:, None] == r[None, :]
    off = ~np.eye(n, dtype=bool)
    intra_measured = m.measured & same & off
    assert not m.measured[same].all()  # some intra-region pairs really were estimated
    # Two peers of one region with a measured neighbour in common inside it: at most two intra-region RTTs.
    shared = (intra_measured.astype(int) @ intra_measured.astype(int) > 0) & same & off & ~m.measured
    assert shared.sum() >= 6  # the case really occurs
    assert m.ms[shared].max() <= 2 * m.ms[intra_measured].max()
    # No estimate between regions falls to the level of a measured RTT inside one.
    assert m.ms[~same].min() > m.ms[intra_measured].max()


@pytest.mark.parametrize("seed", range(10))
def test_groups_from_very_sparse_views_never_mix_regions(seed: int) -> None:
    # Regions of 6, each peer probing 30% of the others: some regions have no measured path inside them.
    ids, region, measurements = planted(4, 6, seed, sample=0.3)
    m = RttMatrix.from_measurements(measurements)
    for lo, hi in [(3, 6), (2, 6)]:
        groups = form_groups(ids, m, min_group=lo, max_group=hi)
        check_groups(groups, ids, lo, hi)
        assert all(len({region[p] for p in g}) == 1 for g in groups)


def test_matrix_validation() -> None:
    with pytest.raises(ConfigError):
        RttMatrix(peers=("b", "a"), ms=np.zeros((2, 2)), measured=np.ones((2, 2), dtype=bool))
    with pytest.raises(ConfigError):
        RttMatrix.from_dense(["a", "b"], [[0.0, 1.0], [2.0, 0.0]])  # asymmetric
    with pytest.raises(ConfigError):
        RttMatrix.from_dense(["a", "a"], np.zeros((2, 2)))
    with pytest.raises(ConfigError):
        RttMatrix.from_dense(["a", "b"], [[0.0, -1.0], [-1.0, 0.0]])
    with pytest.raises(ConfigError):
        RttMatrix.from_measurements({}, max_hops=0)
    m = RttMatrix.from_dense(["b", "a"], [[0.0, 7.0], [7.0, 0.0]])
    assert m.peers == ("a", "b") and m.rtt("b", "a") == 7.0 and m.measured.all()


# --- planted clusters -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize(("lo", "hi"), [(3, 6), (2, 4)])
def test_planted_regions_are_recovered_exactly(seed: int, lo: int, hi: int) -> None:
    ids, region, measurements = planted(3, 4, seed)
    groups = form_groups(ids, RttMatrix.from_measurements(measurements), min_group=lo, max_group=hi)
    assert as_partition(groups) == regions_of(region)


@pytest.mark.parametrize("seed", range(10))
def test_planted_regions_are_recovered_from_sparse_asymmetric_measurements(seed: int) -> None:
    ids, region, measurements = planted(3, 4, seed, sample=0.5)
    m = RttMatrix.from_measurements(measurements)
    assert 0.5 < m.measured.mean() < 0.95  # really sparse, and one-sided for many pairs
    for lo, hi in [(3, 6), (2, 4)]:
        assert as_partition(form_groups(ids, m, min_group=lo, max_group=hi)) == regions_of(region)


def test_oversized_region_is_split_inside_itself_and_small_regions_join_nothing_far() -> None:
    # One region of 7 with groups of at most 6: it must split 3 + 4 (or 4 + 3) internally rather than leave one
    # peer to a far region; the other regions (4 each) stay whole.
    rng = np.random.default_rng(0)
    ids = peer_ids(15, rng)
    region = dict(zip(ids, [0] * 7 + [1] * 4 + [2] * 4, strict=True))
    x = np.full((15, 15), 100.0)
    for (i, p), (j, q) in itertools.product(enumerate(ids), repeat=2):
        if region[p] == region[q]:
            x[i, j] = 0.0 if i == j else 5.0 + rng.uniform()
    x = np.maximum(x, x.T)
    groups = form_groups(ids, RttMatrix.from_dense(ids, x), min_group=3, max_group=6)
    assert all(len({region[p] for p in g}) == 1 for g in groups)
    assert sorted(len(g) for g in groups) == [3, 4, 4, 4]


def test_merge_limit_keeps_far_regions_apart() -> None:
    ids, region, measurements = planted(3, 4, seed=1)
    m = RttMatrix.from_measurements(measurements)
    assert 5 <= default_merge_limit(ids, m, min_group=2) <= 20  # 3 × the ~5 ms to the nearest peer
    # With room for 8 and no limit, two regions of 4 share a group (the greedy fill) ...
    assert len(form_groups(ids, m, min_group=2, max_group=8, max_merge_rtt_ms=math.inf)) == 2
    # ... with the default limit, or an explicit one, they do not.
    for limit in (None, 50.0):
        limited = form_groups(ids, m, min_group=2, max_group=8, max_merge_rtt_ms=limit)
        assert as_partition(limited) == regions_of(region)
    # The limit never breaks the size bounds: with min 6, the repair must still bring regions together.
    check_groups(form_groups(ids, m, min_group=6, max_group=8, max_merge_rtt_ms=50), ids, 6, 8)


# --- size bounds, degenerate inputs, validation ---------------------------------------------------------------


SIZES = [0, 1, 2, 3, 4, 5, 7, 9, 11, 13, 17, 23, 31, 37]
BOUNDS = [(1, 1), (1, 3), (2, 2), (2, 3), (3, 5), (4, 5), (4, 8), (5, 5), (3, 16)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", SIZES)
def test_size_bounds_hold_on_random_matrices(n: int, seed: int) -> None:
    for integer in (False, True):  # integer RTTs: lots of exact ties
        m = random_matrix(n, seed, integer=integer)
        for lo, hi in BOUNDS:
            check_groups(form_groups(m.peers, m, min_group=lo, max_group=hi), list(m.peers), lo, hi)
            for limit in (0.0, 20.0, math.inf):
                limited = form_groups(m.peers, m, min_group=lo, max_group=hi, max_merge_rtt_ms=limit)
                check_groups(limited, list(m.peers), lo, hi)


def test_infeasible_sizes_never_exceed_max_group() -> None:
    m = random_matrix(7, 0)
    groups = form_groups(m.peers, m, min_group=4, max_group=5)  # 7 fits neither one group nor two of 4..5
    assert sorted(len(g) for g in groups) == [3, 4]


def test_subset_of_peers_and_degenerate_inputs() -> None:
    m = random_matrix(10, 1)
    some = list(m.peers[::2])
    groups = form_groups(some, m, min_group=2, max_group=3)
    check_groups(groups, some, 2, 3)
    assert form_groups([], m, min_group=2, max_group=3) == ()
    assert form_groups(m.peers[:1], m, min_group=1, max_group=1) == ((m.peers[0],),)
    assert form_groups(m.peers[:3], m, min_group=4, max_group=6) == (tuple(m.peers[:3]),)
    twice = form_groups(list(m.peers) * 2, m, min_group=1, max_group=10)
    assert twice == form_groups(m.peers, m, min_group=1, max_group=10)
    with pytest.raises(ConfigError):
        form_groups(["nobody", *some], m, min_group=2, max_group=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_group": 0, "max_group": 3},
        {"min_group": 4, "max_group": 3},
        {"min_group": 2.0, "max_group": 3},
        {"min_group": True, "max_group": 3},
        {"min_group": 2, "max_group": 3, "max_merge_rtt_ms": -1.0},
        {"min_group": 2, "max_group": 3, "max_merge_rtt_ms": float("nan")},
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict) -> None:
    m = random_matrix(4, 0)
    with pytest.raises(ConfigError):
        form_groups(m.peers, m, **kwargs)


# --- determinism ------------------------------------------------------------------------------------------------


def shuffled(measurements: Measurements, rng: np.random.Generator) -> Measurements:
    outer = list(measurements.items())
    rng.shuffle(outer)
    result = {}
    for p, row in outer:
        inner = list(row.items())
        rng.shuffle(inner)
        result[p] = dict(inner)
    return result


@pytest.mark.parametrize("seed", range(5))
def test_input_order_does_not_matter(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids, _, measurements = planted(5, 7, seed, sample=0.4)
    reference = RttMatrix.from_measurements(measurements)
    expected = form_groups(ids, reference, min_group=3, max_group=5)
    for variant in range(4):
        view = shuffled(measurements, rng)
        order = list(reversed(ids)) if variant % 2 else list(rng.permutation(ids))
        m = RttMatrix.from_measurements(view, peers=order)
        assert np.array_equal(m.ms, reference.ms) and np.array_equal(m.measured, reference.measured)
        assert form_groups(order, m, min_group=3, max_group=5) == expected


@pytest.mark.parametrize("seed", range(5))
def test_reversing_the_peer_id_order_gives_the_same_groups(seed: int) -> None:
    # Rename peers so that their sorted order is reversed: every tie-break flips, and the planted structure
    # must still come out identically (noise makes real ties unlikely; regions of 4 with max 6 force the answer).
    ids, region, measurements = planted(3, 4, seed, sample=0.6)
    rename = dict(zip(sorted(ids), reversed(sorted(ids)), strict=True))
    renamed = {rename[p]: {rename[q]: v for q, v in row.items()} for p, row in measurements.items()}
    a = form_groups(ids, RttMatrix.from_measurements(measurements), min_group=3, max_group=6)
    b = form_groups(list(rename.values()), RttMatrix.from_measurements(renamed), min_group=3, max_group=6)
    assert (
        {frozenset(rename[p] for p in g) for g in a}
        == as_partition(b)
        == {frozenset(rename[p] for p in g) for g in regions_of(region)}
    )


HASH_SEED_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.test_clustering import planted
from legion_swarm.groups.clustering import RttMatrix, form_groups
ids, _, measurements = planted(6, 9, 11, sample=0.3)
print(json.dumps(form_groups(set(ids), RttMatrix.from_measurements(measurements, peers=set(ids)), min_group=3,
                             max_group=7)))
"""


@pytest.mark.usefixtures("real_processes")
def test_hash_seed_does_not_matter() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        command = [sys.executable, "-c", HASH_SEED_SCRIPT, root]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=True)
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1] and len(outputs[0]) >= 8


# --- the cached agglomeration against a naive one -----------------------------------------------------------------


def naive_agglomerate(d: np.ndarray, max_group: int, limit: float) -> np.ndarray:
    """Same merges, found by a full scan of every cluster pair at every step (lowest mean, then lowest slots)."""
    n = len(d)
    labels = np.arange(n)
    size = np.ones(n, dtype=np.int64)
    s = d.copy()  # the same running sums as the real one, so the means are bit-identical
    while True:
        best = None
        for a in range(n):
            for b in range(a + 1, n):
                if size[a] == 0 or size[b] == 0 or size[a] + size[b] > max_group:
                    continue
                mean = s[a, b] / (size[a] * size[b])
                if mean > limit:
                    continue
                if best is None or mean < best[0]:
                    best = (mean, a, b)
        if best is None:
            return labels
        _, a, b = best
        labels[labels == b] = a
        size[a] += size[b]
        size[b] = 0
        s[a] += s[b]
        s[:, a] = s[a]


@pytest.mark.parametrize("seed", range(8))
def test_cached_agglomeration_matches_the_naive_scan(seed: int) -> None:
    cases = [(9, True, 3, math.inf), (24, True, 5, math.inf), (24, False, 4, math.inf), (30, True, 6, 3.0)]
    cases += [(30, False, 8, 90.0), (16, True, 16, math.inf)]
    for n, integer, hi, limit in cases:
        d = np.array(random_matrix(n, seed, integer=integer).ms)
        assert np.array_equal(clustering._agglomerate(d, hi, limit), naive_agglomerate(d, hi, limit)), (n, hi)


# --- status, scale ------------------------------------------------------------------------------------------------


def test_intra_group_rtt_is_the_median_pair() -> None:
    m = RttMatrix.from_dense(["a", "b", "c", "d"], [[0, 1, 2, 9], [1, 0, 4, 9], [2, 4, 0, 9], [9, 9, 9, 0]])
    assert intra_group_rtt((("a", "b", "c"), ("d",)), m) == {0: 2.0, 1: 0.0}
    ids, _, measurements = planted(3, 4, 0)
    m = RttMatrix.from_measurements(measurements)
    assert all(4 <= v <= 6 for v in intra_group_rtt(form_groups(ids, m, min_group=3, max_group=6), m).values())


def test_thousand_peers_smoke() -> None:
    # A smoke check with a generous bound only; speed goals belong in benchmarks. 8 regions of 125 peers, each
    # peer measuring 32 random others.
    ids, region, measurements = planted(8, 125, seed=5, sample=32 / 999)
    start = time.perf_counter()
    m = RttMatrix.from_measurements(measurements)
    groups = form_groups(ids, m, min_group=4, max_group=8)
    elapsed = time.perf_counter() - start
    check_groups(groups, ids, 4, 8)
    mixed = sum(len({region[p] for p in g}) > 1 for g in groups)
    assert mixed <= len(groups) // 20, mixed  # sparse estimates may misplace a few peers, not many
    assert elapsed < 60, elapsed
