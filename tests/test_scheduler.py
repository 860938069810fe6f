"""The planner, with fake requests: no model, no torch."""

from __future__ import annotations

import pytest

from diffbatch.request import Request, RequestStatus
from diffbatch.scheduler import Scheduler
from diffbatch.spec import GenerationSpec


def fake(request_id: int, shape=(64, 64), steps: int = 3) -> Request:
    return Request(request_id, GenerationSpec(prompt="p", seed=request_id), shape, num_steps=steps)


def run_step(scheduler: Scheduler):
    plan = scheduler.schedule()
    for r in plan.prepare:  # what the runner does: preparation sets the step count
        assert r.status == RequestStatus.WAITING
    return plan, scheduler.update(plan)


def test_batch_is_bounded_by_max_batch_size_and_takes_the_oldest_first():
    scheduler = Scheduler(max_batch_size=3)
    for i in range(5):
        scheduler.add(fake(i))
    plan, _ = run_step(scheduler)
    assert [r.request_id for r in plan.denoise] == [0, 1, 2]
    assert plan.prepare == plan.denoise


def test_running_requests_come_before_newly_admitted_ones():
    scheduler = Scheduler(max_batch_size=2)
    scheduler.add(fake(0, steps=5))
    run_step(scheduler)
    scheduler.add(fake(1))
    scheduler.add(fake(2))
    plan, _ = run_step(scheduler)
    assert [r.request_id for r in plan.denoise] == [0, 1]
    assert [r.request_id for r in plan.prepare] == [1]


def test_only_requests_of_one_latent_shape_share_a_call_and_the_oldest_shape_goes_first():
    scheduler = Scheduler(max_batch_size=8)
    scheduler.add(fake(0, shape=(32, 32)))
    scheduler.add(fake(1, shape=(64, 32)))
    scheduler.add(fake(2, shape=(32, 32)))
    plan, _ = run_step(scheduler)
    assert [r.request_id for r in plan.denoise] == [0, 2]


def test_finished_requests_are_decoded_at_the_next_step_then_leave():
    scheduler = Scheduler(max_batch_size=8)
    scheduler.add(fake(0, steps=1))
    scheduler.add(fake(1, steps=2))
    plan, finished = run_step(scheduler)
    assert finished == [] and plan.denoise[0].status == RequestStatus.DECODING
    plan, finished = run_step(scheduler)
    assert [r.request_id for r in plan.decode] == [0] and [r.request_id for r in plan.denoise] == [1]
    assert [r.request_id for r in finished] == [0]
    plan, finished = run_step(scheduler)
    assert [r.request_id for r in finished] == [1]
    assert not scheduler.has_unfinished() and scheduler.schedule().is_empty


def test_every_request_finishes_with_mixed_steps_and_shapes():
    scheduler = Scheduler(max_batch_size=3)
    for i in range(10):
        scheduler.add(fake(i, shape=((32, 32), (64, 64))[i % 2], steps=1 + i % 4))
    done, steps = [], 0
    while scheduler.has_unfinished():
        plan, finished = run_step(scheduler)
        assert len(plan.denoise) <= 3
        assert len({r.shape_key for r in plan.denoise}) <= 1
        done += finished
        steps += 1
        assert steps < 100
    assert sorted(r.request_id for r in done) == list(range(10))


def test_max_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        Scheduler(0)
