"""The one executor interface (executors/base.py): every executor has it, and ``run_job`` - the CLI job's
driver - writes each image as it finishes, holds only the images in flight, and on the first error cancels
the rest and stops the executor."""

from __future__ import annotations

import concurrent.futures
import gc
import inspect
import threading
import time
import weakref

import pytest

from diffbatch import Engine, GenerationSpec
from diffbatch.executors.base import Cancelled, Encoded, Executor, run_job
from diffbatch.executors.local import EngineLoop
from diffbatch.executors.ray import RayDataExecutor
from diffbatch.executors.serve import ReplicaLoop

EXECUTORS = (EngineLoop, RayDataExecutor, ReplicaLoop)
METHODS = ("start", "submit", "cancel", "queue_length", "stop")


@pytest.mark.parametrize("executor", EXECUTORS, ids=lambda c: c.__name__)
def test_every_executor_has_the_interface(executor):
    for name in METHODS:
        wanted = list(inspect.signature(getattr(Executor, name)).parameters)
        assert list(inspect.signature(getattr(executor, name)).parameters) == wanted, (executor, name)


class Writer:
    """``OutputWriter``'s two write methods, recording what they were given."""

    def __init__(self, on_write=lambda k: None) -> None:
        self.written: list[tuple[int, object]] = []
        self.on_write = on_write

    def write(self, index, result):
        self.on_write(index)
        self.written.append((index, result.spec.prompt))

    def write_encoded(self, index, spec, png, seconds, numerics=""):
        self.on_write(index)
        self.written.append((index, png))


class Scripted:
    """An executor whose futures are settled by the test: ``outcomes[k]`` is a result or an exception."""

    def __init__(self, outcomes) -> None:
        self.outcomes = outcomes
        self.events: list[str] = []
        self.cancelled: list[concurrent.futures.Future] = []

    def start(self):
        self.events.append("start")

    def submit(self, resolved):
        futures = []
        for outcome in self.outcomes[: len(resolved)]:
            future = concurrent.futures.Future()
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            elif outcome is not None:
                future.set_result(outcome)
            futures.append(future)
        return futures

    def cancel(self, futures):
        self.cancelled.extend(futures)
        return len(futures)

    def queue_length(self):
        return 0

    def stop(self, drain_seconds):
        self.events.append("stop")


def specs(n):
    return [GenerationSpec(prompt=f"p{k}", seed=k) for k in range(n)]


def test_run_job_writes_encoded_images_under_their_job_index():
    executor = Scripted([Encoded(b"png-a", 0.5), Encoded(b"png-b", 0.25)])
    writer = Writer()
    run_job(executor, specs(5), [3, 1], writer)
    assert sorted(writer.written) == [(1, b"png-b"), (3, b"png-a")]
    assert executor.events == ["start", "stop"] and executor.cancelled == []


def test_an_image_error_cancels_the_rest_stops_the_executor_and_is_raised():
    executor = Scripted([RuntimeError("boom"), None, None])  # the other two never finish
    with pytest.raises(RuntimeError, match="boom"):
        run_job(executor, specs(3), [0, 1, 2], Writer())
    assert len(executor.cancelled) == 2 and executor.events == ["start", "stop"]


def test_a_write_error_cancels_the_rest():
    executor = Scripted([Encoded(b"x", 0.0), None])

    def disk_full(k):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        run_job(executor, specs(2), [0, 1], Writer(disk_full))
    assert len(executor.cancelled) == 1 and executor.events == ["start", "stop"]


@pytest.mark.slow  # a long job through the loop
def test_the_local_loop_holds_only_the_images_in_flight(tiny_sd_path):
    """A job of any length: each finished image is dropped once written (``Engine.generate`` keeps them all)."""
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=2)
    job = [engine.resolve(GenerationSpec(prompt=f"p{k}", num_inference_steps=2), seed=k) for k in range(6)]
    alive: list[weakref.ref] = []
    writer = Writer()
    original = writer.write

    def write(index, result):
        gc.collect()
        assert not any(ref() is not None for ref in alive), "an image already written is still held"
        original(index, result)
        alive.append(weakref.ref(result))

    writer.write = write
    run_job(EngineLoop(engine), job, range(6), writer)
    assert sorted(k for k, _ in writer.written) == list(range(6))
    assert not engine.has_unfinished()


def test_a_failing_step_fails_the_job_with_its_own_error_and_ends_the_engine_thread(tiny_sd_path, caplog):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")
    job = [engine.resolve(GenerationSpec(prompt="p", num_inference_steps=2), seed=k) for k in range(3)]

    def broken_step():
        raise RuntimeError("a step failed")

    engine.step = broken_step
    loop = EngineLoop(engine, log_errors=False)
    with pytest.raises(RuntimeError, match="a step failed"):
        run_job(loop, job, range(3), Writer())
    assert not loop._thread.is_alive() and not engine.has_unfinished()
    assert not caplog.records  # the CLI says it once, as its own error


def test_cancelled_images_fail_with_cancelled(tiny_sd_path):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")
    loop = EngineLoop(engine)  # not started: nothing runs
    futures = loop.submit([engine.resolve(GenerationSpec(prompt="p", num_inference_steps=2), seed=0)])
    assert loop.cancel(futures) == 1 and loop.queue_length() == 0
    with pytest.raises(Cancelled):
        futures[0].result()


class FakeRay:
    def __init__(self) -> None:
        self.shut = False

    def shutdown(self):
        self.shut = True


class Rows:
    """A dataset's rows, as Ray Data hands them back, in the order given; ``gate`` holds back the rows after
    the first until it is set; ``error`` is raised instead of the last row."""

    def __init__(self, order, gate=None, error=None) -> None:
        self.order, self.gate, self.error, self.pulled = order, gate, error, 0

    def iter_rows(self):
        for n, k in enumerate(self.order):
            if n and self.gate is not None:
                self.gate.wait(10)
            if self.error is not None and n == len(self.order) - 1:
                raise self.error
            self.pulled += 1
            yield {"index": k, "png": f"png{k}".encode(), "seconds": 0.1, "numerics": "float32 cpu"}


def ray_data(monkeypatch, rows):
    import diffbatch.executors.ray as ray_executor

    fake = FakeRay()
    monkeypatch.setattr(ray_executor, "_import_ray", lambda: fake)
    monkeypatch.setattr(ray_executor, "_connect", lambda ray, options: True)
    monkeypatch.setattr(ray_executor, "_results", lambda ray, options, specs, image_hash: rows)
    options = ray_executor.RayOptions(model=None, device="cpu", dtype=None, batch_size=2, address=None, workers=2)
    return RayDataExecutor(options, lambda spec: ""), fake


def test_ray_data_rows_settle_their_own_images_in_any_order(monkeypatch):
    executor, fake = ray_data(monkeypatch, Rows([2, 0, 1]))
    writer = Writer()
    run_job(executor, specs(4), [3, 0, 1], writer)  # submission position 2 is job image 1
    assert sorted(writer.written) == [(0, b"png1"), (1, b"png2"), (3, b"png0")]
    assert fake.shut and executor._specs == {}  # nothing held once written; Ray shut down


def test_ray_data_cancel_drops_the_dataset_and_stop_does_not_wait_for_its_next_row(monkeypatch):
    gate = threading.Event()
    rows = Rows([0, 1, 2, 3], gate=gate)
    executor, fake = ray_data(monkeypatch, rows)
    executor.start()
    futures = executor.submit(specs(4))
    assert isinstance(futures[0].result(timeout=10), Encoded)
    assert executor.cancel(futures[1:]) == 3 and executor.queue_length() == 0
    began = time.monotonic()
    executor.stop(drain_seconds=30)
    assert time.monotonic() - began < 5 and fake.shut
    gate.set()  # the next row comes: the thread sees every future done and drops the dataset
    executor._thread.join(10)
    assert not executor._thread.is_alive() and rows.pulled == 2


def test_ray_data_an_error_fails_the_images_not_yet_back(monkeypatch):
    executor, _ = ray_data(monkeypatch, Rows([0, 1, 2], error=RuntimeError("actor died")))
    writer = Writer()
    with pytest.raises(RuntimeError, match="actor died"):
        run_job(executor, specs(3), [0, 1, 2], writer)
    assert sorted(k for k, _ in writer.written) == [0, 1]
