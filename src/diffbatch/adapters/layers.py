"""The model-call layers: everything that stands between the runner and a model's own code, in one ordered place.

Four things change how a model call runs. From the model outward, each layer calls the ones below it:

1. ``backend``: what computes the modules. Torch runs diffusers' modules; OpenVINO replaces the denoiser's
   ``forward``, the VAE's ``decode``/``_encode`` and the text encoders' ``forward`` with compiled graphs. It goes
   first: the denoiser is converted as diffusers wrote it, and the VAE and text encoders convert on their first
   call, so they trace layer 2.
2. ``invariance``: batch- and thread-invariant kernels (invariance.py) in place of the ``forward`` of leaf
   modules (linears, 1x1 convolutions, GroupNorm, activations) of every torch module; a compiled denoiser has
   none (its fixed call shape makes it invariant).
3. ``lora``: per-row LoRA forwards (lora.py) on PEFT's LoRA layers, calling their base layers (layer 2 below
   them); installed again whenever a LoRA loads, its new A and B matrices made invariant. Torch only.
4. ``step-cache``: the denoiser run in parts (step_cache.py: DeepCache's shallow path, First-Block-Cache's two
   stages), through layers 1-3, so each part keeps the invariant kernels and every row's LoRAs. It patches
   nothing; it needs the denoiser as modules, so torch only.

``LayerStack`` is built by the adapter: installs must come in this order (a layer never patches over one above
it), and a request that needs a layer the backend lacks is refused in one line, from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SpecError


@dataclass(frozen=True)
class Layer:
    name: str
    backends: tuple[str, ...]  # the backends it runs with
    why_not: str = ""  # why the others cannot run it


LAYERS = (
    Layer("backend", ("torch", "openvino")),
    Layer("invariance", ("torch", "openvino")),
    Layer("lora", ("torch",), "its layers are compiled without LoRA branches"),
    Layer("step-cache", ("torch",), "its denoiser runs as one compiled graph"),
)
ORDER = tuple(layer.name for layer in LAYERS)
_BY_NAME = {layer.name: layer for layer in LAYERS}


class LayerStack:
    """The layers installed on one adapter's pipeline, in ``ORDER``."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.installed: list[str] = []  # in install order, each once

    def install(self, name: str, apply: Callable[[], None]) -> None:
        """Run ``apply`` (which patches the modules) as layer ``name``. A layer may be installed again (LoRA: on
        every load), never after a layer above it."""
        above = [done for done in self.installed if ORDER.index(done) > ORDER.index(name)]
        if above:
            raise RuntimeError(f"model-call layer {name!r} installed after {above[0]!r}: the order is "
                               f"{' < '.join(ORDER)}")
        if not self.supports(name):
            raise RuntimeError(f"model-call layer {name!r} does not run with backend {self.backend!r}")
        apply()
        if name not in self.installed:
            self.installed.append(name)

    def supports(self, name: str) -> bool:
        return self.backend in _BY_NAME[name].backends

    def require(self, name: str, field: str, value: object, instead: str = "") -> None:
        """``SpecError`` on ``field`` (one line, naming the way out: backend torch, or ``instead``) where this
        backend cannot run layer ``name``."""
        if self.supports(name):
            return
        reason = f"not supported with backend {self.backend!r} ({_BY_NAME[name].why_not})"
        way_out = "use backend torch" + (f" or {instead}" if instead else "")
        raise SpecError(f"{field}={value!r}: {reason}; {way_out}", field=field, value=value, reason=reason)
