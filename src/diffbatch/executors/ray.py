"""Scale-out on Ray: the job's remaining images as a Ray Data dataset, ``map_batches`` over an actor pool of
diffbatch engines (one per worker, a GPU each where the cluster has GPUs).

``RayDataExecutor`` is the ``base.Executor`` interface over it. Workers return encoded PNG bytes; this process
writes them with the same ``OutputWriter`` as a local run (``base.run_job``), so
the folder layout, file bytes and manifest are the same, and resume works the same (the resume check runs
here, before Ray starts). Specs cross the boundary already resolved (seed and every default set), as JSON of
``GenerationSpec.to_record()``: a worker makes exactly the image a local engine would. Init images are read
by the workers from their paths: on a cluster of several machines they must be on a shared filesystem.

Imported only when ``--ray`` is given; needs ``pip install "diffbatch[ray]"``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io.writer import encode_png
from ..memory import AUTO, BatchSize
from ..quiet import quiet_loading
from ..result import Result
from ..spec import GenerationSpec, spec_from_record
from .base import Cancelled, Encoded, ShuttingDown, settle

ROWS_PER_CALL = 16  # images per map_batches call under --batch-size auto: enough to fill denoiser batches
RAY_ADDRESS = "RAY_ADDRESS"  # Ray's environment variable: the cluster ray.init() joins
LOCAL = "local"  # ray.init's address for a new local cluster, whatever else is running
PROBE_SECONDS = 5.0  # how long a cluster address may take to accept a TCP connection
HINTS = {"--ray": "start one there (ray start --head), or give --ray without an address for a local one",
         RAY_ADDRESS: f"unset {RAY_ADDRESS} (or set it to {LOCAL}) to start a local cluster"}


@dataclass(frozen=True)
class RayOptions:
    """What the driver tells each worker (plain values: it is pickled to the actors)."""

    model: str | None  # as --model; None: the embedded model
    device: str | None
    dtype: str | None
    batch_size: BatchSize
    address: str | None  # None: RAY_ADDRESS, a running `ray start` cluster, or a new local one (choose_cluster)
    workers: int
    backend: str = "torch"
    lora_dir: str | None = None  # as --lora-dir: on a cluster, a folder every worker sees
    lora_paths: bool = False  # a LoRA may be named by its file's path, as in a local run (Resolver)
    model_name: str = ""  # the driver's model name, written into each PNG's parameters (as a local run does)


@dataclass(frozen=True)
class WorkItem:
    """One image for a worker: its position in the submission and its resolved spec as JSON."""

    index: int
    spec: str
    image_hash: str = ""  # the init image file's fingerprint, taken by the driver before the job ran


@dataclass(frozen=True)
class WorkResult:
    """One finished image from a worker."""

    index: int
    png: bytes  # encode_png's bytes, parameters chunk included
    seconds: float
    numerics: str  # the numeric path it was made on


class EngineWorker:
    """A Ray Data actor: loads the model once, then makes the images of each batch it is given."""

    def __init__(self, options: RayOptions) -> None:
        import torch

        from ..engine import Engine

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))  # Ray: the actor's CPUs
        quiet_loading()
        self.options = options
        self.engine = Engine.from_pretrained(options.model, device=options.device, dtype=options.dtype,
                                             max_batch_size=options.batch_size, backend=options.backend,
                                             lora_dir=options.lora_dir, lora_paths=options.lora_paths)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [WorkItem(int(i), str(s), str(h))
                 for i, s, h in zip(batch["index"], batch["spec"], batch["image_hash"], strict=True)]
        specs = [spec_from_record(json.loads(item.spec), f"image {item.index}") for item in items]
        made = self.engine.generate(specs, resolved=True)  # resolved by the driver
        results = [self._finish(item, r) for item, r in zip(items, made, strict=True)]
        return {"index": np.array([r.index for r in results], dtype=np.int64),
                "png": np.array([r.png for r in results], dtype=object),
                "seconds": np.array([r.seconds for r in results], dtype=np.float64),
                "numerics": np.array([r.numerics for r in results], dtype=object)}

    def _finish(self, item: WorkItem, result: Result) -> WorkResult:
        # The driver's model name, as a local run writes it (a worker may see the model under another path).
        result = dataclasses.replace(result, model=self.options.model_name or result.model)
        return WorkResult(item.index, encode_png(result, item.image_hash), result.seconds, result.numerics)


class RayDataExecutor:
    """The ``base.Executor`` interface over a Ray Data actor pool (``generate --ray``). Each ``submit`` is one
    dataset, run in this executor's thread; its images come back as ``Encoded`` PNGs (encoded by the worker,
    with ``image_hash(spec)``, the driver's fingerprint of the spec's init image). Ray Data cannot drop a row
    once the dataset runs: ``cancel`` fails the futures at once, a dataset whose futures are all done is
    dropped (its remaining work with it), and ``stop`` then shuts Ray down without waiting for its next row."""

    def __init__(self, options: RayOptions, image_hash: Callable[[GenerationSpec], str]) -> None:
        self.options, self.image_hash = options, image_hash
        self._ray: Any = None
        self._started = False  # this process initialised Ray (and shuts it down on stop)
        self._jobs: queue.Queue[list[concurrent.futures.Future] | None] = queue.Queue()
        self._specs: dict[concurrent.futures.Future, GenerationSpec] = {}  # submitted, not yet settled here
        self._lock = threading.Lock()
        self._stopping = False
        self._cancels = 0  # cancel() calls so far: a running dataset checks its futures again after one
        self._thread = threading.Thread(target=self._run, name="diffbatch-ray-data", daemon=True)

    def start(self) -> None:
        self._ray = _import_ray()
        self._started = _connect(self._ray, self.options)
        self._thread.start()

    def submit(self, resolved: list[GenerationSpec]) -> list[concurrent.futures.Future]:
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the job is stopping")
            job = [concurrent.futures.Future() for _ in resolved]
            self._specs.update(zip(job, resolved, strict=True))
        self._jobs.put(job)
        return job

    def cancel(self, futures: list[concurrent.futures.Future]) -> int:
        self._cancels += 1
        return sum(settle(future, error=Cancelled("cancelled")) for future in futures)

    def queue_length(self) -> int:
        return sum(not future.done() for future in list(self._specs))

    def stop(self, drain_seconds: float) -> None:
        with self._lock:
            self._stopping = True
        self._jobs.put(None)
        if self._thread.is_alive() and self.queue_length():
            self._thread.join(drain_seconds)
        if self._started:
            self._ray.shutdown()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            open_ = dict(enumerate(job))  # position -> future not yet settled here (a settled one is the caller's)
            del job
            try:
                if open_:
                    self._run_job(open_)
                error: Exception = RuntimeError("Ray Data returned no image for it")
            except Exception as exc:  # noqa: BLE001 - the job's error goes to its futures (raised by the caller)
                error = exc
            for future in open_.values():  # none unless cancelled (a no-op then), failed or cut short
                settle(future, error=error)
            with self._lock:
                for future in open_.values():
                    self._specs.pop(future, None)

    def _run_job(self, open_: dict[int, concurrent.futures.Future]) -> None:
        rows = _results(self._ray, self.options, [self._specs[f] for f in open_.values()], self.image_hash)
        cancels = self._cancels
        for row in rows.iter_rows():
            future = open_.pop(int(row["index"]), None)
            if future is not None:
                settle(future, result=Encoded(bytes(row["png"]), float(row["seconds"]), str(row["numerics"])))
                with self._lock:
                    self._specs.pop(future, None)
            if self._stopping or (cancels != self._cancels and all(f.done() for f in open_.values())):
                return  # cancelled: the dataset's remaining work is dropped with its iterator
            cancels = self._cancels


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part we need
    except ImportError as exc:
        raise InputError(f"--ray needs Ray Data: pip install 'diffbatch[ray]' ({exc.msg})") from None
    return ray


@dataclass(frozen=True)
class Cluster:
    """The Ray cluster a run uses: one to join at ``address``, or a fresh local one (``address`` None)."""

    address: str | None
    origin: str = ""  # where the address came from: "--ray", "RAY_ADDRESS", or ray start's address file

    @property
    def where(self) -> str:
        return f"{self.address} (from {self.origin})"


def choose_cluster(address: str | None) -> Cluster:
    """Where ``--ray [ADDRESS]`` runs; quick and without Ray, so a caller can check it before anything loads.
    An address is used as given (``local``: a fresh cluster). Without one: ``RAY_ADDRESS``, else the cluster
    ``ray start`` left running on this machine (its address file, as ``ray.init()`` reads it), else a fresh
    local cluster. A given address (flag or RAY_ADDRESS) where nothing answers: InputError, one line. An
    address file whose cluster no longer answers (killed without ``ray stop``) is ignored, where ``ray.init()``
    would try to join it."""
    env = os.environ.get(RAY_ADDRESS, "").strip()
    given, origin = (address, "--ray") if address else (env, RAY_ADDRESS)
    if given:
        cluster = Cluster(None if given == LOCAL else given, origin)
        reason = None if cluster.address is None else _unreachable(cluster.address)
        if reason is not None:
            raise InputError(f"--ray: no Ray cluster answers at {cluster.where}: {reason}; {HINTS[origin]}")
        return cluster
    found, path = _address_file()
    if found and _unreachable(found) is None:
        return Cluster(found, str(path))
    return Cluster(None)


def _address_file() -> tuple[str | None, Path | None]:
    """The address in ``ray start``'s address file (``ray_current_cluster`` in Ray's temporary directory,
    which RAY_TMPDIR moves) and the file; None where there is none."""
    try:
        try:  # not public API: found the way ray.init() finds it
            from ray._common.utils import get_ray_address_file
        except ImportError:  # Ray before 2.4x
            from ray._private.utils import get_ray_address_file
        path = Path(get_ray_address_file(None))
        return (path.read_text(encoding="utf-8").strip() or None, path) if path.is_file() else (None, None)
    except (ImportError, OSError, UnicodeDecodeError):  # no such function, an unreadable file: a fresh cluster
        return None, None


def _unreachable(address: str) -> str | None:
    """Why nothing answers at ``host:port`` (``ray://host:port`` too), or None when something does or the
    address has another form (``auto``: ``ray.init`` decides). A TCP connect with a short timeout: a dead
    address fails here in at most PROBE_SECONDS, where ``ray.init`` keeps retrying."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def _connect(ray: Any, options: RayOptions) -> bool:
    """Join the chosen cluster, or start a local one; True when this process initialised Ray. A cluster that
    cannot be reached or started is one line (InputError), before any worker loads the model."""
    # Logical CPUs of a local cluster: one per worker and one for Ray Data's own tasks, at least the machine's cores
    if not connect_cluster(ray, options.address, max(os.cpu_count() or 1, options.workers) + 1):
        return False
    ray.data.DataContext.get_current().enable_progress_bars = False  # we have our own
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # keep stderr for our progress bar; errors still raise
    return True


def connect_cluster(ray: Any, address: str | None, cpus: int) -> bool:
    """Join the cluster ``choose_cluster(address)`` picks, or start a local one of ``cpus`` logical CPUs (``generate
    --ray``, ``serve --ray``); True when this process initialised Ray. One line (InputError) when it cannot."""
    cluster = choose_cluster(address)  # first: an address where nothing answers is refused even with Ray up
    if ray.is_initialized():
        return False
    if cluster.address is None:
        _start_local(ray, cpus)
    else:
        _join(ray, cluster)
    return True


def _join(ray: Any, cluster: Cluster) -> None:
    try:  # no num_cpus: Ray refuses resources when joining a cluster (the cluster has its own)
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    except (OSError, ValueError, RuntimeError) as exc:
        hint = HINTS.get(cluster.origin, "run `ray stop` to remove a stale address file, or give --ray local")
        raise InputError(f"--ray: cannot connect to a Ray cluster at {cluster.where}: {_first_line(exc)}; "
                         f"{hint}") from None
    if cluster.origin != "--ray":  # found, not given: say which cluster the images are made on
        print(f"diffbatch: on the Ray cluster at {cluster.where}; --ray local starts a fresh local one",
              file=sys.stderr)


def _start_local(ray: Any, cpus: int) -> None:
    # "local": a new cluster whatever RAY_ADDRESS or an address file say (ray.init would join those, and refuse
    # num_cpus)
    try:
        ray.init(address=LOCAL, num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"--ray: cannot start a local Ray cluster ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _results(ray: Any, options: RayOptions, specs: Sequence[GenerationSpec],
             image_hash: Callable[[GenerationSpec], str]) -> Any:
    items = [WorkItem(k, json.dumps(spec.to_record(), ensure_ascii=False), image_hash(spec))
             for k, spec in enumerate(specs)]
    rows = ray.data.from_items([dataclasses.asdict(item) for item in items])
    per_call = options.batch_size if options.batch_size != AUTO else ROWS_PER_CALL
    per_call = max(1, min(int(per_call), math.ceil(len(items) / options.workers)))  # every worker gets work
    gpus = 1 if options.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return rows.map_batches(EngineWorker, fn_constructor_kwargs={"options": options}, batch_size=per_call,
                            compute=ray.data.ActorPoolStrategy(size=options.workers), num_cpus=1,
                            num_gpus=gpus, batch_format="numpy")
