"""Issue 25's probe: can a UNet of this shape put content where a position word says, from pure noise?

A fresh UNet and text encoder learn, at the pure-noise timestep only (where a sampler starts and the
layout must come from the caption), to predict the picture's latent from position-only captions ("on the
left"); every few steps the probe prints how far apart its predictions for "on the left" and "on the right"
are (mean |x0(left) - x0(right)| over latent pixels, averaged over 16 noises) against the data's own
difference (the mean latent of left pictures minus that of right ones). A UNet that cannot tell where it
is stays near 0.

    python -m diffbatch_shapes.training.position_probe --levels 3 --steps 300   # the shipped UNet's levels
    python -m diffbatch_shapes.training.position_probe --levels 4 --steps 300   # with a 2x2 level

Measured (docs/shapes_model.md): 3 levels 0.0007 of the data's 0.095 after 300 steps; 4 levels 0.124.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import shapes, shapes_data

LAST = 999  # the pure-noise training timestep


def run(levels: int, steps: int, images: int = 2000, every: int = 50, seed: int = 0,
        model: str | None = None) -> list[tuple[int, float, float]]:
    """(step, |x0(left) - x0(right)|, the data's own difference) every ``every`` steps."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from diffbatch.models import default_model_path

    folder = model or str(default_model_path())
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").float().eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    pictures, scenes = shapes_data.make_dataset(images, seed)
    latents = shapes.encode_all(vae, pictures, False, "cpu")[0] * vae.config.scaling_factor
    where = [s.position for s in scenes]
    ideal = {p: latents[[i for i, q in enumerate(where) if q == p]].mean(0) for p in ("left", "right")}
    target = (ideal["left"] - ideal["right"]).abs().mean().item()
    ids = {p: tokenizer(shapes_data._POSITION_PHRASES[p][0], padding="max_length",
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
           for p in shapes_data.POSITIONS}
    torch.manual_seed(seed)
    unet = shapes.build_unet(levels)
    text_encoder = shapes.build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    alphas = shapes.build_scheduler().alphas_cumprod.float()
    a = alphas[LAST]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=8e-4)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = []
    for step in range(1, steps + 1):
        idx = torch.randint(len(latents), (32,), generator=gen)
        z, caption = latents[idx], torch.stack([ids[where[i]] for i in idx.tolist()])
        noisy = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=gen)
        loss = ((shapes.pure_noise_x0(unet, text_encoder, noisy, caption, alphas) - z) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % every == 0 or step == steps:
            rows.append((step, shapes.position_gaps(unet, text_encoder, tokenizer, alphas)["lr_alone"], target))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbatch_shapes.training.position_probe",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, default=3, help="UNet levels (3: the shipped model's; 4: a 2x2 level)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=2000, help="data-set pictures encoded for the probe")
    parser.add_argument("--model", help="the model folder whose VAE and tokenizer to use (default: embedded)")
    args = parser.parse_args(argv)
    start = time.time()
    for step, apart, target in run(args.levels, args.steps, args.images, model=args.model):
        print(f"levels {args.levels} step {step} ({time.time() - start:.0f}s): |x0(left) - x0(right)| = "
              f"{apart:.4f} (the data's: {target:.4f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
