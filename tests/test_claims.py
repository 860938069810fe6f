"""Claims on batch items live in the store as leases: while one runner holds an item nobody else takes it; a
runner that dies gives its items back when its leases end; a released item is free at once; an item is done
once, whoever finishes it second. The clock is an argument, so no test waits for a lease."""

from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from diffbatch.server.store import LEASE_S, Store  # noqa: E402

T = 1_000_000.0  # a fixed wall clock


@pytest.fixture
def store(tmp_path: Path):
    store = Store(tmp_path / "data")
    store.create_job([{"prompt": f"line {k}"} for k in range(3)])
    yield store
    store.close()


def keys(items) -> list[int]:
    return [item.index for item in items]


def test_a_claimed_item_is_nobody_elses_until_its_lease_ends(store: Store) -> None:
    assert keys(store.claim_items("a", 2, now=T)) == [0, 1]
    assert keys(store.claim_items("b", 5, now=T + 1)) == [2]  # the rest, in order
    assert store.claim_items("b", 5, now=T + LEASE_S - 1) == []
    assert keys(store.claim_items("b", 5, now=T + LEASE_S + 1)) == [0, 1]  # "a" died: its leases ended


def test_renewed_leases_hold_and_released_items_are_free_at_once(store: Store) -> None:
    claimed = store.claim_items("a", 3, now=T)
    assert store.renew_claims("a", now=T + LEASE_S - 1) == 3
    assert store.claim_items("b", 5, now=T + LEASE_S + 1) == []
    store.release_claims("a", claimed[1:])
    assert keys(store.claim_items("b", 5, now=T + LEASE_S + 2)) == [1, 2]


def test_an_item_is_done_once_even_when_a_lease_ran_out_and_two_runners_made_it(store: Store) -> None:
    [first] = store.claim_items("a", 1, now=T)
    [again] = store.claim_items("b", 1, now=T + LEASE_S + 1)  # "a" stalled past its lease
    assert again.index == first.index == 0
    store.finish_item(again, "file-b", None)
    store.finish_item(first, "file-a", None)  # too late: not pending any more
    [row] = [r for r in store.results(first.job_id) if r["index"] == 0]
    assert row["file_id"] == "file-b"
    assert store.renew_claims("a", now=T + LEASE_S + 2) == 0  # a finished item holds no lease


def test_a_server_starting_takes_back_the_leases_a_killed_one_left(store: Store) -> None:
    store.claim_items("killed", 3, now=T)
    assert store.release_all_claims() == 3
    assert keys(store.claim_items("new", 5, now=T + 1)) == [0, 1, 2]
