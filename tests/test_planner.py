"""The planner, with fake requests: no model, no torch."""

from __future__ import annotations

import pytest

from diffbatch.planner import Planner
from diffbatch.request import Request, RequestStatus
from diffbatch.spec import GenerationSpec


def fake(request_id: int, shape=(64, 64), steps: int = 3) -> Request:
    return Request(request_id, GenerationSpec(prompt="p", seed=request_id), shape, num_steps=steps)


def run_step(planner: Planner):
    plan = planner.schedule()
    for r in plan.prepare:  # what the runner does: preparation sets the step count
        assert r.status == RequestStatus.WAITING
    return plan, planner.update(plan)


def test_batch_is_bounded_by_max_batch_size_and_takes_the_oldest_first():
    planner = Planner(max_batch_size=3)
    for i in range(5):
        planner.add(fake(i))
    plan, _ = run_step(planner)
    assert [r.request_id for r in plan.denoise] == [0, 1, 2]
    assert plan.prepare == plan.denoise


def test_running_requests_come_before_newly_admitted_ones():
    planner = Planner(max_batch_size=2)
    planner.add(fake(0, steps=5))
    run_step(planner)
    planner.add(fake(1))
    planner.add(fake(2))
    plan, _ = run_step(planner)
    assert [r.request_id for r in plan.denoise] == [0, 1]
    assert [r.request_id for r in plan.prepare] == [1]


def test_only_requests_of_one_latent_shape_share_a_call_and_the_oldest_shape_goes_first():
    planner = Planner(max_batch_size=8)
    planner.add(fake(0, shape=(32, 32)))
    planner.add(fake(1, shape=(64, 32)))
    planner.add(fake(2, shape=(32, 32)))
    plan, _ = run_step(planner)
    assert [r.request_id for r in plan.denoise] == [0, 2]


def test_finished_requests_are_decoded_at_the_next_step_then_leave():
    planner = Planner(max_batch_size=8)
    planner.add(fake(0, steps=1))
    planner.add(fake(1, steps=2))
    plan, finished = run_step(planner)
    assert finished == [] and plan.denoise[0].status == RequestStatus.DECODING
    plan, finished = run_step(planner)
    assert [r.request_id for r in plan.decode] == [0] and [r.request_id for r in plan.denoise] == [1]
    assert [r.request_id for r in finished] == [0]
    plan, finished = run_step(planner)
    assert [r.request_id for r in finished] == [1]
    assert not planner.has_unfinished() and planner.schedule().is_empty


def test_every_request_finishes_with_mixed_steps_and_shapes():
    planner = Planner(max_batch_size=3)
    for i in range(10):
        planner.add(fake(i, shape=((32, 32), (64, 64))[i % 2], steps=1 + i % 4))
    done, steps = [], 0
    while planner.has_unfinished():
        plan, finished = run_step(planner)
        assert len(plan.denoise) <= 3
        assert len({r.shape_key for r in plan.denoise}) <= 1
        done += finished
        steps += 1
        assert steps < 100
    assert sorted(r.request_id for r in done) == list(range(10))


def test_max_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        Planner(0)
