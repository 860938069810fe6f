"""Engine: the step loop. ``step()`` is schedule -> execute -> update; ``generate()`` loops it to the end."""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .adapters import load_adapter
from .adapters.embeddings import EmbeddingBank
from .adapters.lora import LoraBank
from .errors import ModelLoadError
from .memory import BatchLimits, BatchSize, batch_limits
from .planner import Planner
from .request import Request
from .resolver import Resolver
from .result import Result
from .runner import Runner
from .seeds import job_seed
from .spec import GenerationSpec, ModelDefaults


@dataclass
class EngineStats:
    """Counters for monitoring (the server's /metrics); plain values, read from any thread."""

    steps: int = 0
    denoiser_calls: int = 0
    denoised_images: int = 0  # sum of denoiser batch sizes, in images
    last_batch_size: int = 0  # images in the latest denoiser call
    images_finished: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # denoiser calls by batch size (images)

    def record(self, denoised: int, finished: int) -> None:
        self.steps += 1
        self.last_batch_size = denoised
        if denoised:
            self.denoiser_calls += 1
            self.denoised_images += denoised
            self.batch_sizes[denoised] += 1
        self.images_finished += finished


class Engine:
    def __init__(self, adapter, max_batch_size: BatchSize = 8, vae_batch_size: int | None = None,
                 generator_device: str = "cpu", lora_dir: str | os.PathLike | None = None,
                 lora_paths: bool = False, embeddings_dir: str | os.PathLike | None = None) -> None:
        """``max_batch_size``: images per denoiser call, or "auto" to size batches from memory (memory.py).
        ``lora_dir``: the folder LoRA names are files of (``NAME.safetensors``); ``lora_paths``: a LoRA may also be
        named by its file's path, anywhere (the local CLI; never a server: see ``Resolver``)."""
        self.adapter = adapter
        if embeddings_dir is not None and adapter.backend != "torch":  # OpenVINO's encoders skip torch's hooks
            raise ModelLoadError(f"--embeddings-dir: textual-inversion embeddings run on the torch backend only, "
                                 f"not {adapter.backend}")
        adapter.embeddings = EmbeddingBank(embeddings_dir, adapter.text_dims())
        limits = batch_limits(max_batch_size, adapter.device.type, adapter.dtype.itemsize, vae_batch_size)
        self.planner = Planner(limits.denoise.cap, limits.denoise)
        self.resolver = Resolver(adapter, lora_dir, lora_paths)
        self.loras = LoraBank(adapter.pipe, self.resolver.lora_path, adapter.invariant, adapter.layers)
        self.runner = Runner(adapter, limits, self.resolver.make_sampler, generator_device, self.loras)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # add_request may come from another thread (the server)
        self._seconds: dict[int, float] = {}
        self.stats = EngineStats()

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | None = None, device: str | None = None,
                        dtype: str | None = None, max_batch_size: BatchSize = 8, vae_batch_size: int | None = None,
                        generator_device: str = "cpu", batch_invariant: bool = True, backend: str = "torch",
                        lora_dir: str | os.PathLike | None = None, lora_paths: bool = False,
                        embeddings_dir: str | os.PathLike | None = None) -> Engine:
        """Load a diffusers pipeline folder or hub id (``None``: the embedded default model).
        ``batch_invariant=False`` drops the invariance kernels and call shapes (adapters/invariance.py): an
        image may then change by a few uint8 levels with its batch or the thread count. ``dtype`` None or
        "auto": the device's fastest exact dtype (loading.resolve_dtype). ``backend="openvino"``: the models
        run on OpenVINO (CPU; adapters/openvino.py states its contract)."""
        adapter = load_adapter(model, device, dtype, invariant=batch_invariant, backend=backend)
        return cls(adapter, max_batch_size, vae_batch_size, generator_device, lora_dir, lora_paths, embeddings_dir)

    @property
    def model_name(self) -> str:
        return self.resolver.model_name

    @property
    def model_hash(self) -> str:
        return self.resolver.model_hash

    @property
    def numerics(self) -> str:
        """The numeric path every image of this engine is made on (numerics.py), e.g. ``bfloat16 cpu``."""
        return str(self.adapter.numerics)

    @property
    def defaults(self) -> ModelDefaults:
        return self.resolver.defaults

    def sampler_label(self, spec: GenerationSpec) -> str:
        return self.resolver.sampler_label(spec)

    def resolve(self, spec: GenerationSpec, seed: int | None = None) -> GenerationSpec:
        """Fill defaults (``seed`` when the spec has none; random if both are None) and check the result."""
        return self.resolver.resolve(spec, seed)

    def add_request(self, spec: GenerationSpec, seed: int | None = None) -> int:
        """Admit one image; it joins the running batch at the next step. Returns its request id."""
        return self.admit(self.resolve(spec, seed))

    def admit(self, resolved: GenerationSpec) -> int:
        """Admit a spec already returned by ``resolve`` (no second validation); returns its request id."""
        # The init image is read when the request is prepared, not held from admission: a job of many
        # img2img requests would otherwise keep every decoded image in memory at once. LoRAs load now, in the
        # caller's thread (the server admits in the engine thread), so a bad one fails this request alone.
        self.loras.ensure(resolved.loras)
        with self._lock:
            request = Request(next(self._ids), resolved, (resolved.height, resolved.width),
                              started=time.perf_counter())
            self.planner.add(request)
            self._seconds[request.request_id] = 0.0
        return request.request_id

    @property
    def limits(self) -> BatchLimits:
        """The denoiser and VAE batch limits per image shape (lowered after an out-of-memory error)."""
        return self.runner.limits

    @property
    def max_batch_size(self) -> int:
        """Most images per denoiser call (the fixed ``--batch-size``, or the cap under "auto")."""
        return self.planner.max_batch_size

    def abort(self, request_ids: Iterable[int] | None = None) -> None:
        """Drop unfinished requests (all of them when ``request_ids`` is None); they make no image."""
        with self._lock:
            ids = list(self.planner.requests) if request_ids is None else list(request_ids)
            self.planner.abort(ids)
            for request_id in ids:
                self._seconds.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.planner.has_unfinished()

    def num_unfinished(self) -> int:
        return len(self.planner.requests)

    def step(self) -> list[Result]:
        """One engine iteration: schedule, execute, update. Returns the images finished in it."""
        with self._lock:
            plan = self.planner.schedule()
        if plan.is_empty:
            return []
        began = time.perf_counter()
        pixels = self.runner.execute(plan)
        self._charge(plan.decode + plan.denoise, time.perf_counter() - began)
        with self._lock:
            finished = self.planner.update(plan)
        self.stats.record(len(plan.denoise), len(finished))
        return [self._result(r, pixels[r.request_id]) for r in finished]

    def generate(self, specs: Sequence[GenerationSpec], on_result: Callable[[Result], None] | None = None,
                 base_seed: int | None = None, resolved: bool = False) -> list[Result]:
        """Make every image; results in input order, each with its position as ``index``. Image k without a
        seed gets ``base_seed + k`` (a random seed when ``base_seed`` is None); ``on_result`` sees each image
        as it finishes. ``resolved=True``: the specs come from ``resolve`` already and are not checked again."""
        if not resolved:
            seeds = [None if base_seed is None else job_seed(base_seed, k) for k in range(len(specs))]
            specs = [self.resolve(s, seed) for s, seed in zip(specs, seeds, strict=True)]
        ids = {self.admit(spec): k for k, spec in enumerate(specs)}
        results: list[Result | None] = [None] * len(specs)
        try:
            while ids:
                for result in self.step():
                    k = ids.pop(result.request_id, None)
                    if k is None:
                        continue  # a request someone else added
                    results[k] = dataclasses.replace(result, index=k)
                    if on_result is not None:
                        on_result(results[k])
        except BaseException:
            self.abort(list(ids))  # a failed step leaves none of this call's requests behind to fail the next
            raise
        return results  # type: ignore[return-value]

    def _charge(self, requests: list[Request], seconds: float) -> None:
        unique = {r.request_id for r in requests}
        for request_id in unique:
            self._seconds[request_id] += seconds / len(unique)

    def _ti_hashes(self, spec: GenerationSpec) -> tuple[tuple[str, str], ...]:
        """(name, hash) of each textual-inversion embedding the image was made with, in the order met."""
        guided = self.adapter.uses_cfg(spec)  # without CFG, no negative prompt is encoded
        texts = [pair for name, pair in spec.prompt_texts().items() if guided or "negative" not in name]
        used = [e for text, skip in texts for e in self.adapter.embeddings_in(text, spec.emphasis, skip)]
        return tuple(dict.fromkeys((e.name, e.hash) for e in used))

    def _result(self, request: Request, pixels: np.ndarray) -> Result:
        image = Image.fromarray((pixels * 255).round().astype("uint8"))  # as diffusers' numpy_to_pil
        seconds = self._seconds.pop(request.request_id)
        spec = request.origin or request.spec  # as asked (a hires request ran a second pass)
        return Result(request.request_id, spec, image, pixels, seconds, self.sampler_label(spec), self.model_name,
                      lora_hashes=self.loras.hashes(spec.loras), model_hash=self.model_hash, numerics=self.numerics,
                      ti_hashes=self._ti_hashes(spec))
