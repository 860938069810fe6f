"""One-shot GPU check (issue 12), run by ``benchmarks/gpu_check.sh``: the SDXL architecture with random
weights in float16 at 1024x1024 (steps reduced, not resolution), built on the device (no download, no save).

Prints, as one markdown table each:
- images/s of diffbatch (mixed and uniform workloads) vs diffusers list batches (identical parameters,
  chunked at the same batch size) and per-image calls, with each strategy's peak device memory;
- the denoiser's batch efficiency: one UNet forward at 1..16 rows, ms per row;
- ``--batch-size auto`` under a real out-of-memory error: the auto limit is read for the shape, then a
  ballast tensor leaves too little memory for it; the engine must split, retry and still make every image
  bit-identical to an unconstrained run.

``--tiny --device cpu`` runs the same code on the tests' tiny SDXL pipeline in seconds (CI runs it so the
script cannot rot while no GPU is lent); the out-of-memory part needs CUDA and is skipped there.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_md import table  # noqa: E402

from diffbatch import Engine, GenerationSpec  # noqa: E402
from diffbatch.adapters.config import PipelineConfig  # noqa: E402
from diffbatch.adapters.sdxl import StableDiffusionXLAdapter  # noqa: E402

ROWS = (1, 2, 4, 8, 16)


def sdxl_random(device: str, dtype: torch.dtype, tokenizer_dir: Path):
    """The SDXL base architecture (UNet 320-640-1280 with 1/2/10 transformer layers, VAE 128-512, CLIP-L and
    OpenCLIP-bigG text encoders) with random weights, built on the device."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tiny import write_byte_level_clip_tokenizer

    torch.manual_seed(0)
    tokens = dict(vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=1024,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            scaling_factor=0.13025, force_upcast=True)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, **tokens))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_attention_heads=20, num_hidden_layers=32,
                                                            projection_dim=1280, **tokens))
    tokenizer = write_byte_level_clip_tokenizer(tokenizer_dir, max_length=77)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, scheduler=scheduler, add_watermarker=False)
    return pipe.to(device, dtype)


def sdxl_tiny(device: str, dtype: torch.dtype, tokenizer_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    from tiny_sdxl import tiny_sdxl_components

    return StableDiffusionXLPipeline(**tiny_sdxl_components(tokenizer_dir), add_watermarker=False).to(device, dtype)


def workloads(n: int, size: int) -> dict[str, list[GenerationSpec]]:
    rng = np.random.default_rng(0)
    from PIL import Image

    init = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    uniform = [GenerationSpec(prompt=f"prompt {k}", seed=k, num_inference_steps=4, guidance_scale=5.0)
               for k in range(n)]
    kinds = itertools.cycle(itertools.product((2, 4, 6), (1.0, 5.0), (None, 0.5, None, 0.75)))
    mixed = [GenerationSpec(prompt=f"prompt {k}", seed=k, num_inference_steps=st, guidance_scale=g,
                            image=init if s else None, strength=s)
             for k, (st, g, s) in zip(range(n), kinds, strict=False)]
    return {"mixed": mixed, "uniform": uniform}


def synced(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.startswith("cuda") else "-"


def diffusers_images(pipe, specs: list[GenerationSpec], size: int) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    s = specs[0]
    generators = [torch.Generator("cpu").manual_seed(x.seed) for x in specs]
    kwargs = dict(prompt=[x.prompt for x in specs], num_inference_steps=s.num_inference_steps,
                  guidance_scale=s.guidance_scale, generator=generators, output_type="np")
    if s.image is None:
        pipe(**kwargs, height=size, width=size)
    else:
        StableDiffusionXLImg2ImgPipeline(**pipe.components)(**kwargs, image=[x.image for x in specs],
                                                            strength=s.strength)


def list_batches(pipe, specs: list[GenerationSpec], size: int, batch: int) -> None:
    groups: dict[tuple, list[GenerationSpec]] = {}
    for s in specs:
        groups.setdefault((s.num_inference_steps, s.guidance_scale, s.strength), []).append(s)
    for group in groups.values():
        for i in range(0, len(group), batch):
            diffusers_images(pipe, group[i : i + batch], size)


def throughput(pipe, engine: Engine, device: str, n: int, size: int, batch: int) -> str:
    sync, rows = synced(device), []
    for name, specs in workloads(n, size).items():
        strategies = {"diffusers per image": lambda s=specs: [diffusers_images(pipe, [x], size) for x in s],
                      "diffusers list batches": lambda s=specs: list_batches(pipe, s, size, batch),
                      "diffbatch": lambda s=specs: engine.generate(s)}
        strategies["diffbatch"]()  # warm-up (kernels, allocator), diffusers' too
        list_batches(pipe, specs[:2], size, batch)
        for strategy, run in strategies.items():
            peak_reset(device)
            sync()
            began = time.perf_counter()
            run()
            sync()
            seconds = time.perf_counter() - began
            rows.append([name, strategy, f"{seconds:.2f}", f"{len(specs) / seconds:.2f}", peak_gib(device)])
        per = {r[1]: float(r[3]) for r in rows if r[0] == name}
        ratio = per["diffbatch"] / per["diffusers list batches"]
        rows.append([name, "**diffbatch / list batches**", "", f"**{ratio:.2f}x**", ""])
    return table(["workload", "strategy", "seconds", "images/s", "peak GiB"], rows)


def batch_curve(pipe, device: str, size: int) -> str:
    unet, sync, rows = pipe.unet, synced(device), []
    h = size // pipe.vae_scale_factor
    for n in ROWS:
        sample = torch.randn(n, 4, h, h, device=device, dtype=unet.dtype)
        text = torch.randn(n, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
        pooled = pipe.text_encoder_2.config.projection_dim
        added = {"text_embeds": torch.randn(n, pooled, device=device, dtype=unet.dtype),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * n, device=device, dtype=unet.dtype)}
        t = torch.full((n,), 500.0, device=device)
        with torch.inference_mode():
            unet(sample, t, text, added_cond_kwargs=added)
            sync()
            began = time.perf_counter()
            for _ in range(3):
                unet(sample, t, text, added_cond_kwargs=added)
            sync()
        ms = (time.perf_counter() - began) / 3 * 1000
        rows.append([n, f"{ms:.1f}", f"{ms / n:.1f}"])
    return table(["rows", "ms per call", "ms per row"], rows)


def auto_under_oom(pipe, device: str, size: int) -> str:
    """The auto limit for the shape is read with the memory free now; a ballast then takes most of what
    is left, so calls of that limit run out of memory for real and must be split."""
    specs = workloads(12, size)["uniform"]
    reference = Engine(StableDiffusionXLAdapter(PipelineConfig.of(pipe), "sdxl-random", pipe), max_batch_size=1)
    expected = [r.pixels for r in reference.generate(specs)]
    engine = Engine(StableDiffusionXLAdapter(PipelineConfig.of(pipe), "sdxl-random", pipe), max_batch_size="auto")
    engine.generate(specs[:1])  # plans the shape: the auto limit is read now, with memory free
    shape = (size, size)
    before = engine.limits.denoise(shape)
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(int(free * 0.9), dtype=torch.uint8, device=device)
    try:
        made = engine.generate(specs)
    finally:
        del ballast
        torch.cuda.empty_cache()
    after = engine.limits.denoise(shape)
    same = all(np.array_equal(a.pixels, b) for a, b in zip(made, expected, strict=True))
    return table(["auto limit before", "after the OOM", "images made", "bit-identical to one-at-a-time"],
                 [[before, after, len(made), same]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny SDXL (a CPU smoke run)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    size = 64 if args.tiny else 1024
    with tempfile.TemporaryDirectory() as scratch:
        pipe = (sdxl_tiny if args.tiny else sdxl_random)(args.device, dtype, Path(scratch) / "tokenizer")
    pipe.set_progress_bar_config(disable=True)
    engine = Engine(StableDiffusionXLAdapter(PipelineConfig.of(pipe), "sdxl-random", pipe),
                    max_batch_size=args.batch_size)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"## GPU check: SDXL architecture{' (tiny)' if args.tiny else ''}, {size}x{size}, {dtype}, {name}, "
          f"torch {torch.__version__}\n")
    print("### Throughput\n\n" + throughput(pipe, engine, args.device, args.images, size, args.batch_size) + "\n")
    print("### Denoiser batch efficiency\n\n" + batch_curve(pipe, args.device, size) + "\n")
    if args.device.startswith("cuda"):
        print("### --batch-size auto under a real out-of-memory error\n\n" + auto_under_oom(pipe, args.device, size))
    else:
        print("### --batch-size auto under a real out-of-memory error\n\nskipped: needs CUDA")


if __name__ == "__main__":
    main()
