"""Few-step samplers (issue 36, started): LCM and TCD per request, an LCM-distilled UNet's guidance embedding
(``time_cond_proj_dim``) per row, and guidance-free rows at one row a step, each image diffusers' own alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from diffbatch import Engine, GenerationSpec
from tiny import tiny_sd_components


@pytest.fixture(scope="module")
def lcm_model(tmp_path_factory) -> Path:
    """The tiny SD with an LCM-distilled UNet's guidance embedding (``time_cond_proj_dim``) and LCM as its own
    sampler, as LCM-distilled checkpoints ship."""
    folder = tmp_path_factory.mktemp("tiny-lcm")
    components = tiny_sd_components(folder / "tokenizer", seed=5)
    torch.manual_seed(5)
    components["unet"] = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2, time_cond_proj_dim=8)
    components["scheduler"] = LCMScheduler.from_config(components["scheduler"].config)
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(
        folder / "model", safe_serialization=True)
    return folder / "model"


def reference(model: Path, spec: GenerationSpec) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if spec.scheduler == "tcd":
        from diffusers import TCDScheduler

        pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    return pipe(spec.prompt, negative_prompt=spec.negative_prompt or None, guidance_scale=spec.guidance_scale,
                num_inference_steps=spec.num_inference_steps, eta=spec.eta or 0.0,
                generator=torch.Generator().manual_seed(spec.seed), output_type="np").images[0]


SPECS = [GenerationSpec(prompt="a red dot", seed=1, num_inference_steps=4, guidance_scale=1.0),
         GenerationSpec(prompt="a blue dot", negative_prompt="green", seed=2, num_inference_steps=4,
                        guidance_scale=4.0),
         GenerationSpec(prompt="a tan ring", seed=3, num_inference_steps=2, guidance_scale=1.5, scheduler="lcm"),
         GenerationSpec(prompt="a red ring", seed=4, num_inference_steps=4, guidance_scale=1.0, scheduler="tcd",
                        eta=0.3)]


def test_an_lcm_distilled_unet_in_a_mixed_batch_is_diffusers_alone_with_one_row_for_guidance_free_requests(
        lcm_model):
    engine = Engine.from_pretrained(lcm_model, device="cpu", dtype="float32")
    rows: list[int] = []
    calls = engine.runner._calls

    def counted(model, sample, *args):  # noqa: ANN001, ANN202 - the rows of a set of calls, before padding
        rows.append(int(sample.shape[0]))
        return calls(model, sample, *args)

    engine.runner._calls = counted
    results = engine.generate(SPECS)
    del engine.runner._calls
    for result in results:
        assert np.abs(result.pixels - reference(lcm_model, result.spec)).max() <= 1e-4, result.spec.prompt
    for spec, result in zip(SPECS, results, strict=True):
        assert np.array_equal(result.pixels, engine.generate([spec])[0].pixels)
    # one row a step each: an LCM-distilled UNet takes its guidance as an embedding, never as CFG (as diffusers)
    assert sum(rows) == sum(s.num_inference_steps for s in SPECS)


def test_guidance_free_rows_cost_one_row_a_step_beside_guided_ones(tiny_sd_path):
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32")
    rows: list[int] = []
    calls = engine.runner._calls

    def counted(model, sample, *args):  # noqa: ANN001, ANN202
        rows.append(int(sample.shape[0]))
        return calls(model, sample, *args)

    engine.runner._calls = counted
    specs = [GenerationSpec(prompt="a", seed=1, num_inference_steps=3, guidance_scale=g, scheduler=name)
             for g, name in ((1.0, "lcm"), (7.5, "euler"), (0.5, "tcd"), (3.0, None))]
    engine.generate(specs)
    assert sum(rows) == sum(s.num_inference_steps * (2 if s.guidance_scale > 1 else 1) for s in specs)


def test_lcm_and_deepcache_run_together_on_an_lcm_distilled_unet(lcm_model):
    engine = Engine.from_pretrained(lcm_model, device="cpu", dtype="float32")
    spec = GenerationSpec(prompt="a red dot", seed=1, num_inference_steps=12, guidance_scale=1.0,
                          cache="deepcache:3")
    alone = engine.generate([spec])[0]
    batched = engine.generate([spec, *SPECS])[0]
    assert np.array_equal(alone.pixels, batched.pixels)
