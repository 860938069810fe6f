"""A pipeline's configuration without its weights: model_index.json and the configs of its diffusers
components (denoiser, VAE, scheduler), read from a folder or the hub's JSON files, or taken from a loaded
pipeline. Everything the engine needs to resolve and check a spec comes from here, so a process that only
plans a job (the ``--ray`` driver) never loads a model."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import diffusers

from ..errors import ModelLoadError
from .hub import hub_offline, looks_like_path, read_model_index

CONFIG_COMPONENTS = ("unet", "transformer", "vae", "scheduler")  # what defaults and checks read


@dataclass(frozen=True)
class PipelineConfig:
    index: Mapping[str, Any]  # model_index.json: component classes and pipeline flags
    components: Mapping[str, Mapping[str, Any]]  # component name -> its config, class defaults filled in

    @classmethod
    def of(cls, pipe: Any) -> PipelineConfig:
        """The configuration of a loaded pipeline (what diffusers made of the same files)."""
        components = {name: dict(getattr(pipe, name).config) for name in CONFIG_COMPONENTS
                      if getattr(pipe, name, None) is not None}
        return cls(dict(pipe.config), components)

    @classmethod
    def read(cls, model: str) -> PipelineConfig:
        """The configuration of a folder or hub id, JSON files only (a hub id downloads nothing else)."""
        index = read_model_index(model)
        components = {}
        for name in CONFIG_COMPONENTS:
            library, class_name = (index.get(name) or [None, None])[:2]
            if library != "diffusers" or class_name is None:
                continue
            component = getattr(diffusers, class_name, None)
            if component is None:
                raise ModelLoadError(f"model {model!r}: its {name} is a {class_name}, which this diffusers "
                                     f"({diffusers.__version__}) does not have")
            components[name] = _with_defaults(component, _load_config(component, model, name))
        return cls(index, components)

    def component(self, name: str) -> Mapping[str, Any]:
        """A component's config; empty when the pipeline has no such component."""
        return self.components.get(name, {})

    @property
    def vae_scale_factor(self) -> int:
        """As every diffusers pipeline computes it: 2 ** (VAE down blocks - 1), 8 without a VAE."""
        blocks = self.component("vae").get("block_out_channels")
        return 2 ** (len(blocks) - 1) if blocks else 8

    @property
    def default_scheduler(self) -> str:
        """Class name of the model's own scheduler."""
        return self.component("scheduler").get("_class_name") or self.index["scheduler"][1]


def _load_config(component: Any, model: str, subfolder: str) -> dict[str, Any]:
    where = {} if looks_like_path(model) else {"local_files_only": hub_offline()}
    try:
        return dict(component.load_config(model, subfolder=subfolder, **where))
    except Exception as exc:  # noqa: BLE001 - hub and file errors come in many types; all mean "cannot read"
        raise ModelLoadError(f"model {model!r}: cannot read the config of its {subfolder}: {exc}") from None


def _with_defaults(component: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Keys a config file leaves out take the class's defaults, as ``from_config`` does."""
    params = inspect.signature(component.__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **config}
