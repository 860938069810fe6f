"""``diffbatch serve --ray``: the server's engine as a Ray Serve deployment of N replicas.

The ingress is the diffbatch server process itself: the same FastAPI app (routes, auth, per-key limits, UI,
store, retention, metrics) under the same uvicorn with its slow-client deadlines, holding the SQLite store; it
loads no weights (it resolves requests from the model's configuration, as ``generate --ray`` does). Its engine
executor is ``ReplicaLoop`` (``base.Executor``: submit, cancel, queue length, stop): each image goes
through a Ray Serve handle to the engine deployment, and Ray Serve's router sends it to a replica (power of two
choices on ongoing requests, bounded by ``max_ongoing_requests``). Each replica is a diffbatch engine under
its own ``EngineLoop``: images arriving while it runs join its batch at the next step (continuous batching).

Faults: a replica that dies (a killed actor, an out-of-memory kill) fails its in-flight images in the handle
with an actor error; each is sent again (to another replica, or to the one Ray Serve starts in its place). An
image is a pure function of its spec, so the retry makes the same bytes; a batch item is recorded done once,
by the ingress, when its image comes back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..engine import EngineStats
from ..errors import DiffbatchError, InputError
from ..spec import GenerationSpec
from .base import Cancelled, QueueFull, ShuttingDown, settle

log = logging.getLogger("diffbatch.server")
APP = "diffbatch"
DEPLOYMENT = "diffbatch-engine"
RETRIES = 3  # sends of one image when replicas die under it


@dataclass(frozen=True)
class ReplicaOptions:
    """What each engine replica loads and how Ray Serve scales them."""

    model: str | None
    device: str | None
    dtype: str | None
    backend: str
    lora_dir: str | None
    max_batch_size: int
    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: Ray Serve autoscaling on ongoing requests
    max_replicas: int | None = None
    cpus: float = 1.0  # logical CPUs per replica (Ray's scheduling)
    gpus: float = 0.0  # GPUs per replica (one each where the cluster has them)
    threads: int | None = None  # torch threads per replica (None: torch's default)

    @property
    def autoscaling(self) -> dict[str, Any] | None:
        if self.min_replicas is None and self.max_replicas is None:
            return None
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        return {"min_replicas": low, "max_replicas": high, "initial_replicas": min(max(self.replicas, low), high),
                "target_ongoing_requests": 2 * self.max_batch_size}


class EngineReplica:
    """One replica: a diffbatch engine in its own engine loop (made a Ray Serve deployment by ``deploy``)."""

    def __init__(self, options: ReplicaOptions) -> None:
        import torch

        from ..engine import Engine
        from ..quiet import quiet_loading
        from .local import EngineLoop

        quiet_loading()
        if options.threads:
            torch.set_num_threads(options.threads)
        self.engine = Engine.from_pretrained(options.model, device=options.device, dtype=options.dtype,
                                             max_batch_size=options.max_batch_size, backend=options.backend,
                                             lora_dir=options.lora_dir)
        self.loop = EngineLoop(self.engine)  # the ingress bounds what is in flight
        self.loop.start()
        self.name = _replica_name()

    async def generate(self, spec: GenerationSpec) -> tuple[Any, dict[str, Any]]:
        """The image of a resolved spec, with this replica's name, queue length and engine stats."""
        [future] = self.loop.submit([spec])
        try:
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the ingress cancelled it (client gone): stop it before its next step
            self.loop.cancel([future])
            raise
        return result, {"replica": self.name, "queue": self.loop.queue_length(), "stats": self.engine.stats,
                        "pid": os.getpid()}


def _replica_name() -> str:
    try:
        from ray import serve

        context = serve.get_replica_context()
        replica = getattr(context, "replica_id", None)  # Ray 2.10+: a ReplicaID; before: replica_tag, a string
        return str(getattr(replica, "unique_id", None) or getattr(context, "replica_tag", replica))
    except Exception:  # noqa: BLE001 - outside Serve (tests): the process id names it
        return f"pid-{os.getpid()}"


def deploy(options: ReplicaOptions) -> Any:
    """Start the engine deployment (no Serve HTTP proxy: the diffbatch server is the ingress); its handle."""
    from ray import serve

    serve.start(http_options={"location": "NoServer"}, detached=False)
    deployment = serve.deployment(
        EngineReplica, name=DEPLOYMENT, max_ongoing_requests=4 * options.max_batch_size,
        ray_actor_options={"num_cpus": options.cpus, "num_gpus": options.gpus},
        **({"autoscaling_config": options.autoscaling} if options.autoscaling else
           {"num_replicas": options.replicas}))
    return serve.run(deployment.bind(options), name=APP, route_prefix=None)


@dataclass
class _Sent:
    spec: GenerationSpec
    future: concurrent.futures.Future
    response: Any = None  # the handle's DeploymentResponse for the current attempt
    attempts: int = 0


@dataclass
class ReplicaFacts:
    """What the ingress knows of each replica, from the answers it got (for /metrics)."""

    queues: dict[str, int] = field(default_factory=dict)
    stats: dict[str, EngineStats] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    retried: int = 0  # images sent again after a replica died under them


class ReplicaLoop:
    """The ``base.Executor`` interface over a Ray Serve handle. ``engine``: what the ingress resolves with (a
    ``Resolver``: configuration, no weights), with ``stats`` summed over the replicas' latest answers."""

    def __init__(self, engine: Any, handle: Any, max_queue: int) -> None:
        self.engine = engine
        self.handle = handle
        self.max_queue = max_queue
        self.facts = ReplicaFacts()
        self._sent: dict[concurrent.futures.Future, _Sent] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="diffbatch-replicas", daemon=True)
        engine.stats = EngineStats()

    def start(self) -> None:
        self._thread.start()

    def submit(self, resolved: list[GenerationSpec]) -> list[concurrent.futures.Future]:
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._sent) + len(resolved) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._sent)} of {self.max_queue} images)")
            items = [_Sent(spec, concurrent.futures.Future()) for spec in resolved]
            for item in items:
                self._sent[item.future] = item
        for item in items:
            asyncio.run_coroutine_threadsafe(self._run(item), self._loop)
        return [item.future for item in items]

    def cancel(self, futures: list[concurrent.futures.Future]) -> int:
        cancelled = 0
        with self._lock:
            items = [self._sent.pop(f) for f in futures if f in self._sent]
        for item in items:
            if item.response is not None:
                self._loop.call_soon_threadsafe(item.response.cancel)
            if not item.future.done():
                settle(item.future, error=Cancelled("cancelled by the client"))
                cancelled += 1
        return cancelled

    def queue_length(self) -> int:
        """Images sent and not yet answered, over all replicas."""
        return len(self._sent)

    def stop(self, drain_seconds: float) -> None:
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + drain_seconds
        while self._sent and time.monotonic() < deadline:
            time.sleep(0.05)
        for future in list(self._sent):
            self.cancel([future])
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _run(self, item: _Sent) -> None:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        try:
            while True:
                item.attempts += 1
                item.response = self.handle.generate.remote(item.spec)
                try:
                    result, facts = await item.response
                except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                    if item.future.done() or item.attempts >= RETRIES:
                        raise
                    self.facts.retried += 1
                    log.warning("a replica died under an image (%s); sending it again", type(exc).__name__)
                    continue
                except RayTaskError as exc:  # raised in the replica: its own error (a LoRA that does not load)
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    raise cause if isinstance(cause, DiffbatchError) else exc from None
                self._record(facts)
                settle(item.future, result=result)
                return
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - every failure goes to the waiting request, none kills the loop
            settle(item.future, error=exc)
        finally:
            with self._lock:
                self._sent.pop(item.future, None)

    def live_facts(self) -> ReplicaFacts:
        """``facts`` for the replicas alive now (Ray's named actors of this deployment): a killed replica's series
        end with it, and its replacement shows (0 images) before its first answer. Ray unreachable: ``facts``."""
        alive = _live_replicas()
        if alive is None:
            return self.facts
        facts = self.facts
        return ReplicaFacts({name: facts.queues.get(name, 0) for name in alive},
                            {name: stats for name, stats in facts.stats.items() if name in alive},
                            {name: facts.images.get(name, 0) for name in alive}, facts.retried)

    def _record(self, facts: dict[str, Any]) -> None:
        name = facts["replica"]
        self.facts.queues[name] = facts["queue"]
        self.facts.stats[name] = facts["stats"]
        self.facts.images[name] = self.facts.images.get(name, 0) + 1
        self.engine.stats = _summed(self.facts.stats.values())


def _live_replicas() -> set[str] | None:
    """The ids of this deployment's live replicas (the part of a replica actor's name after its last ``#``, which
    ``_replica_name`` reports), or None when Ray cannot say."""
    try:
        import ray

        actors = ray.util.list_named_actors(all_namespaces=True)
    except Exception:  # noqa: BLE001 - no Ray, or its control store gone: the facts as answered
        return None
    prefix = f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"
    return {actor["name"][len(prefix):] for actor in actors if actor["name"].startswith(prefix)}


def _summed(all_stats: Any) -> EngineStats:
    total = EngineStats()
    for stats in all_stats:
        total.images_finished += stats.images_finished
        total.denoiser_calls += stats.denoiser_calls
        total.denoised_images += stats.denoised_images
        total.last_batch_size = max(total.last_batch_size, stats.last_batch_size)
        for size, calls in stats.batch_sizes.items():
            total.batch_sizes[size] = total.batch_sizes.get(size, 0) + calls
    return total


def check_options(options: ReplicaOptions) -> None:
    """Bad ``--replicas``/``--min-replicas``/``--max-replicas``: one line, before Ray starts."""
    if options.replicas < 1:
        raise InputError(f"--replicas {options.replicas} is invalid: must be an integer >= 1")
    low, high = options.min_replicas, options.max_replicas
    if low is not None and low < 0:
        raise InputError(f"--min-replicas {low} is invalid: must be an integer >= 0")
    if high is not None and high < 1:
        raise InputError(f"--max-replicas {high} is invalid: must be an integer >= 1")
    if low is not None and high is not None and low > high:
        raise InputError(f"--min-replicas {low} is over --max-replicas {high}")


def check_cluster_gpus(options: ReplicaOptions, cluster_gpus: float) -> None:
    """More GPUs asked than the cluster has: one line, before any replica loads the model."""
    wanted = options.gpus * max(options.replicas, options.min_replicas or 0)
    if wanted > cluster_gpus:
        raise InputError(f"--replicas: {wanted:g} GPUs asked ({options.gpus:g} per replica) but the Ray cluster "
                         f"has {cluster_gpus:g}")
