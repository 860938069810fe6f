"""The shapes training command: its noise schedule reaches every diffusers sampler, its loss weights,
and a few-step run end to end (writes a folder plain diffusers loads; ``--vae-from`` reuses its VAE)."""

import json

import diffusers
import pytest
import torch
from diffbatch_shapes.training import shapes
from diffbatch_shapes.training.shapes import (
    TERMINAL_ALPHA_BAR,
    build_scheduler,
    min_snr_weights,
    zero_terminal_snr_betas,
)
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

from diffbatch.samplers import SAMPLERS


def test_zero_snr_betas_match_diffusers_own_rescaling():
    ours = build_scheduler().alphas_cumprod
    theirs = EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             rescale_betas_zero_snr=True).alphas_cumprod
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7)
    assert ours[-1].item() == pytest.approx(TERMINAL_ALPHA_BAR, rel=1e-3)
    assert (ours[1:] < ours[:-1]).all()
    assert len(zero_terminal_snr_betas()) == 1000


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_samples_with_the_trained_schedule(name):
    """The betas travel as ``trained_betas``, which every diffusers scheduler reads, so samplers without a
    zero-SNR option (PNDM, LMS, Heun, ...) still start from pure noise at the last training step."""
    config = build_scheduler().config
    sampler = getattr(diffusers, SAMPLERS[name].class_name).from_config(config, **SAMPLERS[name].options)
    assert sampler.config.prediction_type == "v_prediction"
    assert sampler.alphas_cumprod[-1].item() == pytest.approx(TERMINAL_ALPHA_BAR, rel=1e-3)
    sampler.set_timesteps(10)
    assert int(sampler.timesteps[0]) == 999  # "trailing": the first step is the pure-noise one
    for key, value in {"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}.items():
        assert sampler.config.get(key, value) == value, key  # SD's settings, where the sampler has them


def test_v_weights_are_min_snr_in_x0_space_with_an_optional_floor():
    alphas_cumprod = build_scheduler().alphas_cumprod
    t = torch.tensor([999, 700, 0])
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    plain = min_snr_weights(alphas_cumprod, t, 5.0, "v_prediction")
    assert torch.allclose(plain, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert plain[0].item() < 1e-6  # zero terminal SNR: no weight on the pure-noise step
    floored = min_snr_weights(alphas_cumprod, t, 5.0, "v_prediction", floor=1.0)
    assert floored[0].item() == pytest.approx(1.0, abs=1e-6)
    assert floored[1].item() == pytest.approx((1 / (snr[1] + 1)).item())
    assert floored[2].item() == pytest.approx((5 / (snr[2] + 1)).item())
    eps = min_snr_weights(alphas_cumprod, t[1:], 5.0, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 5 / snr[2].item()]))


@pytest.mark.slow  # three short training runs
def test_a_few_step_run_writes_a_standard_folder_and_vae_from_reuses_its_vae(tmp_path):
    few = ["--num-images", "48", "--vae-steps", "2", "--vae-minutes", "0", "--decoder-steps", "2",
           "--decoder-minutes", "0", "--unet-steps", "2", "--unet-minutes", "0", "--vae-batch", "4",
           "--decoder-batch", "2", "--unet-batch", "4", "--warmup", "1", "--threads", "1", "--layout-steps", "2",
           "--layout-minutes", "0"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert shapes.main([*few, "--out", str(first)]) == 0
    scheduler = json.loads((first / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["timestep_spacing"] == "trailing"
    pipe = StableDiffusionPipeline.from_pretrained(first, local_files_only=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)
    assert pipe.unet.config.block_out_channels == [32, 64, 128, 128]  # the layout phase grew it by a 2x2 level

    assert shapes.main([*few, "--out", str(second), "--vae-from", str(first)]) == 0
    vae_a, vae_b = (StableDiffusionPipeline.from_pretrained(f, local_files_only=True).vae for f in (first, second))
    for a, b in zip(vae_a.state_dict().values(), vae_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    third = tmp_path / "third"  # the layout phase alone on a saved folder: its VAE and tokenizer kept
    assert shapes.main([*few, "--out", str(third), "--layout-of", str(second)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(third, local_files_only=True)
    for a, b in zip(vae_b.state_dict().values(), pipe.vae.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    unet_b = StableDiffusionPipeline.from_pretrained(second, local_files_only=True).unet
    assert not all(torch.equal(a, b) for a, b in zip(unet_b.state_dict().values(), pipe.unet.state_dict().values(),
                                                      strict=True))  # trained further


def test_the_layout_phase_draws_its_noisiest_rows_at_the_pure_noise_end():
    cfg = shapes.TrainConfig(unet_batch=32, layout_share=0.5, layout_from_t=900, layout_position_first=10)
    assert shapes.layout_rows(cfg, 0) == (32, 999) and shapes.layout_rows(cfg, 9) == (32, 999)  # position first
    assert shapes.layout_rows(cfg, 10) == (16, 900)
    t = shapes.draw_timesteps(32, 1000, torch.Generator().manual_seed(0), 16, cfg.layout_from_t)
    assert bool((t[:16] >= cfg.layout_from_t).all()) and int(t[16:].min()) < cfg.layout_from_t
    t = shapes.draw_timesteps(32, 1000, torch.Generator().manual_seed(0))
    assert int(t.min()) < 100


def test_complete_rows_name_every_attribute():
    from diffbatch_shapes.training import shapes_data
    from transformers import CLIPTokenizer

    from diffbatch.models import default_model_path

    tokenizer = CLIPTokenizer.from_pretrained(default_model_path(), subfolder="tokenizer")
    _, scenes = shapes_data.make_dataset(8, seed=3)
    batcher = shapes.CaptionBatcher(tokenizer, scenes, shapes.TrainConfig(caption_dropout=0.5, attribute_drop=0.9))
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in batcher.ids(list(range(8)), complete=5)]
    for text, scene in zip(texts[:5], scenes[:5], strict=True):
        assert all(word in text for word in (scene.size, scene.colour, scene.shape, scene.background)), text
        assert any(phrase in text for phrase in shapes_data._POSITION_PHRASES[scene.position]), text
    assert not all(scene.background in text for text, scene in zip(texts[5:], scenes[5:], strict=True))  # dropped


def test_growing_the_unet_keeps_every_trained_weight_one_level_up():
    torch.manual_seed(0)
    small = shapes.build_unet(3)
    grown = shapes.grow_unet(small, 4)
    assert len(grown.config.block_out_channels) == 4 and grown.config.sample_size == 16
    kept, new = small.state_dict(), grown.state_dict()
    for key, value in kept.items():
        if key.startswith("up_blocks."):
            _, index, rest = key.split(".", 2)
            key = f"up_blocks.{int(index) + 1}.{rest}"
        assert torch.equal(new[key], value), key
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in new if k not in kept and not k.startswith("up_blocks")} \
        >= {"down_blocks.3"}
    sample = torch.randn(2, 4, 16, 16)
    out = grown(sample, torch.tensor([999, 10]), encoder_hidden_states=torch.randn(2, 5, 128)).sample
    assert out.shape == sample.shape
    assert shapes.grow_unet(grown, 4) is grown  # already that deep: unchanged
    with pytest.raises(ValueError, match="3-level UNet to 4 levels, not 3 to 5"):
        shapes.grow_unet(small, 5)


@pytest.mark.slow  # a short training run
def test_the_position_probe_runs_and_measures_against_the_data():
    """Issue 25's probe (a 2x2 UNet level is what lets position train): a two-step run on the embedded
    model's VAE reports the left/right gap of its predictions and the data's own gap."""
    from diffbatch_shapes.training import position_probe

    rows = position_probe.run(levels=4, steps=2, images=64, every=1)
    assert [step for step, _, _ in rows] == [1, 2]
    assert all(0 <= apart < target for _, apart, target in rows)  # untrained: far below the data's gap
    assert rows[0][2] > 0.1
