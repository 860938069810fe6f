"""The Resolver resolves and checks specs from a model's configuration files alone (no weights), exactly as
the engine that loaded the model does, for every family; the ``--ray`` driver uses it and loads no model."""

import shutil
from pathlib import Path

import pytest

from diffbatch import Engine, GenerationSpec
from diffbatch.cli import main
from diffbatch.errors import DiffbatchError
from diffbatch.resolver import Resolver
from tiny import save_tiny_sd
from tiny_flow import save_tiny_flux, save_tiny_sd3
from tiny_sdxl import noise_picture, save_tiny_sdxl

SAVERS = {
    "sd": save_tiny_sd,
    "sdxl": save_tiny_sdxl,
    "sdxl-refiner": lambda folder: save_tiny_sdxl(folder, refiner=True),
    "sd3": lambda folder: save_tiny_sd3(folder, dynamic_shift=True),
    "flux": save_tiny_flux,
}


def config_only_copy(folder: Path, dest: Path) -> Path:
    """The pipeline's JSON and tokenizer text files; no weights at all."""
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt", ".model"):
            target = dest / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    assert not list(dest.rglob("*.safetensors"))
    return dest


def outcome(resolver, spec: GenerationSpec):
    try:
        return resolver.resolve(spec, seed=3)
    except DiffbatchError as exc:
        return type(exc).__name__, exc.field, str(exc)


@pytest.mark.parametrize("family", SAVERS)
def test_config_only_resolver_equals_the_loaded_engine(family, tmp_path):
    folder = SAVERS[family](tmp_path / "full" / "model")
    engine = Engine.from_pretrained(folder, device="cpu", dtype="float32")
    resolver = Resolver.for_model(config_only_copy(folder, tmp_path / "bare" / "model"))
    image = tmp_path / "init.png"
    noise_picture(40, 24).save(image)
    specs = [GenerationSpec(prompt="a"), GenerationSpec(prompt="b", width=48, num_inference_steps=3),
             GenerationSpec(prompt="c", image=str(image)), GenerationSpec(prompt="d", scheduler="euler_a"),
             GenerationSpec(prompt="e", negative_prompt="blur", guidance_rescale=0.5),
             GenerationSpec(prompt="f", scheduler="pndm", num_inference_steps=1),
             GenerationSpec(prompt="g", width=36)]
    assert resolver.defaults == engine.defaults and resolver.model_name == engine.model_name
    found = [outcome(resolver, s) for s in specs]
    assert found == [outcome(engine, s) for s in specs]
    assert any(isinstance(f, GenerationSpec) for f in found) and any(isinstance(f, tuple) for f in found)
    assert [resolver.sampler_label(s) for s in specs] == [engine.sampler_label(s) for s in specs]


def test_ray_driver_resolves_without_loading_the_model(tmp_path, monkeypatch):
    """``generate --ray`` hands the workers the specs a local engine would resolve; the driver loads nothing."""
    import diffbatch.executors.ray as ray_executor

    local = Engine.from_pretrained(None, device="cpu", dtype="float32")
    expected = [local.resolve(GenerationSpec(prompt=p, num_inference_steps=2), seed=k)
                for k, p in enumerate(["a red circle", "a blue star"])]
    handed = {}

    class Stop(Exception):
        pass

    class FakeRayData:  # the executor interface, recording what the driver hands the workers
        def __init__(self, options, image_hash):
            handed.update(options=options)

        def start(self):
            pass

        def submit(self, specs):
            handed.update(specs=list(specs))
            raise Stop  # handed over: nothing is made

        def stop(self, drain_seconds):
            pass

    def no_loading(*args, **kwargs):
        raise AssertionError("the --ray driver loaded a model")

    monkeypatch.setattr(ray_executor, "RayDataExecutor", FakeRayData)
    monkeypatch.setattr(Engine, "from_pretrained", no_loading)
    out = tmp_path / "out"
    with pytest.raises(Stop):
        main(["generate", "--prompt", "a red circle", "--prompt", "a blue star", "--steps", "2", "--seed", "0",
              "--out", str(out), "--ray", "--no-gallery"])
    assert handed["specs"] == expected and handed["options"].model_name == local.model_name
    assert handed["options"].model is None  # the workers load the embedded model themselves


def test_a_step_count_that_would_index_past_the_training_timesteps_is_refused_at_admission(tiny_sd_path):
    # DDIM with steps_offset=1 at 1000 steps reaches timestep 1000 of 1000: diffusers fails inside step(), which
    # inside a batch would fail every image in it; refused when the request arrives instead
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")
    with pytest.raises(DiffbatchError, match="past the model's 1000 training timesteps") as refused:
        engine.resolve(GenerationSpec(prompt="x", num_inference_steps=1000), seed=0)
    assert refused.value.field == "num_inference_steps"
    assert engine.resolve(GenerationSpec(prompt="x", num_inference_steps=999), seed=0).num_inference_steps == 999
