"""Train the embedded default model on procedural shapes: ``python -m diffbatch.training.shapes``.

Three phases from a fixed seed: (1) a small AutoencoderKL (factor 4: 64x64 RGB -> 4x16x16) on crops,
(1b) its decoder alone on whole pictures, then (2) a small CLIP text encoder and UNet2DConditionModel
trained jointly on the VAE's latents (v-prediction on a zero-terminal-SNR schedule), with caption
dropout so classifier-free guidance works; (3) the layout phase: the UNet grown by a 2x2 level and taught,
at the pure-noise step first, to put the shape where its caption says (issue 25).
The result is a standard diffusers Stable Diffusion folder (float16 safetensors) that
``StableDiffusionPipeline.from_pretrained`` loads as is.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffbatch.adapters.loading import resolve_device
from diffbatch.errors import ModelLoadError
from diffbatch.models import model_folder

from . import shapes_data
from .tokenizer import MODEL_MAX_LENGTH, write_tokenizer_files

DEFAULT_OUT = model_folder()  # diffbatch's package data: the embedded model users get


@dataclass
class TrainConfig:
    seed: int = 0
    num_images: int = 40_000  # pre-rendered training pictures (captions are re-drawn every step)
    vae_steps: int = 4_000  # upper bounds: with *_minutes set, a phase ends when its time is up
    vae_minutes: float = 11.0  # 0: run all the steps; else the LR schedule follows elapsed time
    vae_batch: int = 32
    vae_crop: int = 32  # the VAE is fully convolutional, so it trains on random crops (4x cheaper)
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-4  # per latent element, against per-pixel reconstruction losses
    vae_decoder_noise: float = 0.05  # extra latent noise (x latent std) so the decoder forgives sampling error
    vae_bf16: bool = True  # autocast the VAE's convolutions to bfloat16 (AMX); master weights stay float32
    decoder_steps: int = 3_000  # phase 1b: the decoder alone on whole pictures (encoder frozen)
    decoder_minutes: float = 9.0
    decoder_batch: int = 16
    decoder_lr: float = 5e-4
    unet_steps: int = 20_000
    unet_minutes: float = 60.0
    unet_batch: int = 32
    unet_lr: float = 8e-4
    warmup: int = 200
    caption_dropout: float = 0.15  # empty caption -> the unconditional branch for CFG
    attribute_drop: float = 0.25  # each of size / position / background left out of a caption
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023)
    min_snr_floor: float = 0.0  # v targets: x0-space weight clamp(SNR, floor, gamma); 1.0 measured worse
    prediction_type: str = "v_prediction"  # or "epsilon"
    zero_terminal_snr: bool = True  # Lin et al. 2024: no signal left at the last timestep
    ema_decay: float = 0.999
    # (3) layout (issue 25; phase 4 in docs/shapes_model.md). From (2)'s EMA weights, the UNet grown by a 2x2 level
    # (from pure noise only a level where every cell touches the zero padding can tell where it is), with a fresh
    # optimiser. The first layout_position_first steps put every row at the pure-noise step with a caption naming
    # every attribute (the first-step prediction, where a sampler starts and the layout can only come from the
    # caption); after them layout_share of each batch is at t >= layout_from_t (complete captions, x0-space
    # weight 1) and the rest as in (2), which brings back what the growth disturbed. 0 steps: no layout phase.
    layout_steps: int = 100_000  # an upper bound: the phase ends when its minutes are up
    layout_minutes: float = 62.0
    layout_lr: float = 8e-4
    layout_share: float = 0.5
    layout_from_t: int = 900
    layout_levels: int = 4  # grow the UNet to this many levels first (0: keep it as (2) left it)
    layout_position_first: int = 400
    unet_bf16: bool = False  # measured: no faster for this small UNet on 1-2 cores (casts cost as much)
    save_every: int = 500
    threads: int = 2  # torch CPU threads
    unet_levels: int = 3  # (2)'s UNet: 16x16, 8x8, 4x4 (cross-attention at 8x8, 4x4); 4: 2x2 from the start
    device: str = "cpu"  # "cuda" trains the same recipe on a GPU (the shipped weights come from the CPU)


# ---------------------------------------------------------------------------------------------- models

def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32,
        mid_block_add_attention=False,
    )


def build_text_encoder(vocab_size: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=eos_id, projection_dim=128,
    )
    return CLIPTextModel(config)


def build_unet(levels: int = 3):
    """The shipped UNet (3 levels); ``levels=4`` adds a cross-attention level at 2x2, where each latent cell is
    a quadrant of the picture and the convolutions' zero padding marks every cell's side (issue 25's probe)."""
    from diffusers import UNet2DConditionModel

    extra = levels - 3
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128) + (128,) * extra, norm_num_groups=32, cross_attention_dim=128,
        # attention only at 8x8 and below: self-attention over 16x16 latents cost most of a step on CPU
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (2 + extra),
        up_block_types=("CrossAttnUpBlock2D",) * (2 + extra) + ("UpBlock2D",),
        attention_head_dim=32,
    )


TERMINAL_ALPHA_BAR = 2.0**-24  # what diffusers' Euler schedulers put at the last step for zero SNR


def zero_terminal_snr_betas(num_train_timesteps: int = 1000) -> list[float]:
    """Stable Diffusion's betas rescaled to zero terminal SNR (Lin et al. 2024, Algorithm 1), with the
    last cumulative alpha at 2**-24 rather than 0 (as diffusers' Euler schedulers do) so that every
    sampler's sigma stays finite. Stored as ``trained_betas`` in the scheduler config, so that every
    diffusers scheduler - not only those with a ``rescale_betas_zero_snr`` option - samples with them."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_bar = torch.cumprod(1 - rescale_zero_terminal_snr(betas), dim=0)
    alphas_bar[-1] = TERMINAL_ALPHA_BAR
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return [float(b) for b in 1 - alphas]


def build_scheduler(prediction_type: str = "v_prediction", zero_terminal_snr: bool = True):
    """The model's noise schedule and default sampler (Euler ancestral), as a standard diffusers
    scheduler config that every diffusers sampler reads. With ``zero_terminal_snr`` (the default) the
    betas are SD's rescaled to zero terminal SNR, sampled with "trailing" spacing so that sampling
    starts from pure noise at the last training timestep; otherwise SD's own betas and spacing."""
    from diffusers import EulerAncestralDiscreteScheduler

    schedule = ({"trained_betas": zero_terminal_snr_betas(), "timestep_spacing": "trailing"}
                if zero_terminal_snr else {"timestep_spacing": "leading"})
    scheduler = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, prediction_type=prediction_type, **schedule,
    )
    # Stable Diffusion's settings for the samplers that read them (its own scheduler config holds them
    # too). Without clip_sample=False, DDIM's default clips every x0 prediction to [-1, 1], which wrecks
    # unit-variance latents (measured: background 3% instead of 100% with --scheduler ddim).
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    return scheduler


# ---------------------------------------------------------------------------------------------- helpers

def autocast(enabled: bool, device: str = "cpu"):
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


class Schedule:
    """Training progress in [0, 1]: by steps, or by wall time when a time budget is set (then the run
    stops when its minutes are up and prints the step count reached; rerun with that many steps and no
    time budget to repeat it exactly)."""

    def __init__(self, steps: int, minutes: float) -> None:
        self.steps, self.seconds, self.start = steps, minutes * 60, time.time()

    def progress(self, step: int) -> float:
        by_steps = step / self.steps
        return max(by_steps, (time.time() - self.start) / self.seconds) if self.seconds else by_steps

    def lr(self, step: int, base: float, warmup: int) -> float:
        """Linear warm-up, then cosine decay to 10% of ``base``."""
        if step < warmup:
            return base * (step + 1) / warmup
        progress = min(1.0, self.progress(step))
        return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def run(self, name: str, opt: torch.optim.Optimizer, base_lr: float, warmup: int) -> Iterator[int]:
        """A phase's step indices, each with the optimiser's learning rate set, until its steps or its time
        budget run out (then it says at which step)."""
        for step in range(self.steps):
            if self.progress(step) >= 1:
                print(f"[{name}] time budget reached at step {step}", flush=True)
                return
            for group in opt.param_groups:
                group["lr"] = self.lr(step, base_lr, warmup)
            yield step


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


class LossLog:
    """Prints a loss line every ``every`` steps with the running mean and wall time."""

    def __init__(self, name: str, total: int, start: float, every: int = 50) -> None:
        self.name, self.total, self.start, self.every, self.values = name, total, start, every, []

    def add(self, step: int, **values: float) -> None:
        self.values.append(values)
        if (step + 1) % self.every and step + 1 != self.total:
            return
        mean = {k: sum(v[k] for v in self.values) / len(self.values) for k in values}
        text = " ".join(f"{k}={v:.4f}" for k, v in mean.items())
        print(f"[{self.name}] step {step + 1}/{self.total} {text} "
              f"elapsed={(time.time() - self.start) / 60:.1f}min", flush=True)
        self.values = []


# ---------------------------------------------------------------------------------------------- VAE phase

def train_vae(cfg: TrainConfig, images: np.ndarray, start: float):
    """Reconstruction (L1 + MSE) plus a small KL term that keeps the latent space smooth and decodable."""
    dev = cfg.device
    vae = build_vae().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    progress = LossLog("vae", cfg.vae_steps, start)
    for step in Schedule(cfg.vae_steps, cfg.vae_minutes).run("vae", opt, cfg.vae_lr, 100):
        x = random_crops(images, cfg.vae_batch, cfg.vae_crop, gen).to(dev)  # [B, 3, crop, crop]
        with autocast(cfg.vae_bf16, dev):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(decoder_input(posterior, cfg.vae_decoder_noise, gen, dev)).sample.float()
        mse, l1 = F.mse_loss(recon, x), F.l1_loss(recon, x)
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1 - posterior.logvar.float()).mean()
        loss = mse + l1 + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        progress.add(step, mse=mse.item(), l1=l1.item(), kl=kl.item())
    return vae.eval()


def finetune_decoder(cfg: TrainConfig, vae, images: np.ndarray, start: float):
    """Train the decoder (and ``post_quant_conv``) on whole 64x64 pictures with the encoder frozen, so the
    latent space the UNet learns is unchanged. Crop training alone left a decoder that relied on the
    zero padding of nearby borders: bright frames and washed-out interiors on whole pictures."""
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    progress = LossLog("decoder", cfg.decoder_steps, start)
    for step in Schedule(cfg.decoder_steps, cfg.decoder_minutes).run("decoder", opt, cfg.decoder_lr, 50):
        idx = torch.randint(len(images), (cfg.decoder_batch,), generator=gen).numpy()
        x = to_tensor(images[idx]).to(cfg.device)  # [B, 3, 64, 64]
        with autocast(cfg.vae_bf16, cfg.device):
            with torch.no_grad():
                z = decoder_input(vae.encode(x).latent_dist, cfg.vae_decoder_noise, gen, cfg.device)
            recon = vae.decode(z).sample.float()
        mse, l1 = F.mse_loss(recon, x), F.l1_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        (mse + l1).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        progress.add(step, mse=mse.item(), l1=l1.item())
    return vae.requires_grad_(False).eval()


def finetune_saved_decoder(cfg: TrainConfig, folder: Path) -> None:
    """Phase 1b alone, on a saved model folder (rewritten in place)."""
    from diffusers import StableDiffusionPipeline

    start = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    images, _ = shapes_data.make_dataset(cfg.num_images, cfg.seed)
    vae = finetune_decoder(cfg, pipe.vae.float().to(cfg.device), images, start)
    save_pipeline(folder, {"vae": vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
                           "unet": pipe.unet, "scheduler": pipe.scheduler})
    print(f"saved {folder} in {(time.time() - start) / 60:.1f} min", flush=True)


@torch.no_grad()
def whiten_latents(vae, means: torch.Tensor, stds: torch.Tensor, gen: torch.Generator):
    """Give every latent channel zero mean and unit std by folding a per-channel affine map into the
    VAE's 1x1 ``quant_conv`` (encoder side) and its inverse into ``post_quant_conv`` (decoder side).
    Decoding is unchanged; SD pipelines only apply one scalar ``scaling_factor``, and a small VAE's
    channels can sit at offsets of several stds from each other, far from the sampler's N(0, 1)."""
    sampled = means + stds * torch.randn(means.shape, generator=gen)  # [N, C, h, w]
    m, s = sampled.mean(dim=(0, 2, 3)), sampled.std(dim=(0, 2, 3))  # [C]
    c = len(m)
    q, pq = vae.quant_conv, vae.post_quant_conv
    m, s = m.to(q.weight.device), s.to(q.weight.device)
    q.weight[:c] /= s.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - m) / s
    q.bias[c:] -= 2 * s.log()  # log-variance of the rescaled posterior
    pq.bias += pq.weight[:, :, 0, 0] @ m
    pq.weight *= s.view(1, -1, 1, 1)
    print(f"latent channels: mean={m.tolist()} std={s.tolist()} -> whitened", flush=True)
    m, s = m.cpu().view(1, -1, 1, 1), s.cpu().view(1, -1, 1, 1)
    return (means - m) / s, stds / s


def decoder_input(posterior, extra_noise: float, gen: torch.Generator, device: str) -> torch.Tensor:
    """A sample of the posterior plus a little extra noise (``extra_noise`` x its std), so the decoder
    learns to forgive the sampling error of latents a denoiser makes."""
    z = posterior.mean + posterior.std * randn(posterior.mean.shape, gen, device)
    return z + extra_noise * z.detach().std() * randn(z.shape, gen, device)


def randn(shape, gen: torch.Generator, device: str) -> torch.Tensor:
    """Normal noise drawn on the CPU from ``gen`` (so a seed means the same numbers on any device)."""
    return torch.randn(shape, generator=gen).to(device)


def random_crops(images: np.ndarray, batch: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(len(images), (batch,), generator=gen).numpy()
    y0, x0 = torch.randint(images.shape[1] - crop + 1, (2,), generator=gen).tolist()
    return to_tensor(np.ascontiguousarray(images[idx, y0:y0 + crop, x0:x0 + crop]))


@torch.no_grad()
def encode_all(vae, images: np.ndarray, bf16: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (on the CPU): [N, 4, 16, 16] each."""
    means, stds = [], []
    for k in range(0, len(images), 256):
        with autocast(bf16, device):
            posterior = vae.encode(to_tensor(images[k:k + 256]).to(device)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------- UNet phase

class CaptionBatcher:
    """Draws a fresh caption for each picked scene (with dropout) and tokenizes it, with a cache."""

    def __init__(self, tokenizer, scenes, cfg: TrainConfig) -> None:
        self.tokenizer, self.scenes, self.cfg = tokenizer, scenes, cfg
        self.rng = random.Random(cfg.seed + 2)
        self.cache: dict[str, list[int]] = {}

    def ids(self, indices: list[int], complete: int = 0) -> torch.Tensor:
        """Token ids of a caption for each scene; the first ``complete`` rows name every attribute (no
        dropout of the caption or of its size, position and background)."""
        rows = []
        for k, i in enumerate(indices):
            if k < complete:
                text = shapes_data.caption(self.scenes[i], self.rng, 0.0)
            elif self.rng.random() < self.cfg.caption_dropout:
                text = ""
            else:
                text = shapes_data.caption(self.scenes[i], self.rng, self.cfg.attribute_drop)
            if text not in self.cache:
                self.cache[text] = self.tokenizer(text, padding="max_length",
                                                  max_length=MODEL_MAX_LENGTH,
                                                  truncation=True).input_ids
            rows.append(self.cache[text])
        return torch.tensor(rows)  # [B, L]


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float,
                    prediction_type: str = "epsilon", floor: float = 0.0) -> torch.Tensor:
    """Per-item loss weight (Min-SNR, Hang et al. 2023): an x0-space weight of min(SNR, gamma), i.e.
    min(SNR, gamma) / SNR on an epsilon target and min(SNR, gamma) / (SNR + 1) on a v target. For v
    targets ``floor`` raises the x0-space weight to at least ``floor``: plain Min-SNR gives the noisiest
    half of a zero-terminal-SNR schedule weights near 0, and those are the steps where the layout must
    come from the caption. Measured on this model (docs/shapes_model.md): floor 1 learned the shape's
    colour far more slowly (12% after 2,500 steps, against 92% after 2,000 steps
    without it) and did not teach positions either."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    if prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma).clamp(min=floor) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def train_denoiser(cfg: TrainConfig, models: dict, latents: tuple[torch.Tensor, torch.Tensor, float],
                   batcher: CaptionBatcher, out: Path, start: float, layout: bool = False) -> dict:
    """Joint text encoder + UNet training (v or epsilon target, Min-SNR weights); returns the EMA models.
    ``layout``: (3), the layout phase (``layout_*`` settings), from ``models`` as given ((2)'s EMA weights)."""
    if layout and cfg.layout_levels:
        models = {**models, "unet": grow_unet(models["unet"], cfg.layout_levels).to(cfg.device)}
    unet = models["unet"].train().requires_grad_(True)
    text_encoder = models["text_encoder"].train().requires_grad_(True)
    ema = {"unet": copy.deepcopy(unet).requires_grad_(False),
           "text_encoder": copy.deepcopy(text_encoder).requires_grad_(False)}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    name, total, minutes, lr, warmup = (("layout", cfg.layout_steps, cfg.layout_minutes, cfg.layout_lr, 50) if layout
                                        else ("unet", cfg.unet_steps, cfg.unet_minutes, cfg.unet_lr, cfg.warmup))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    alphas_cumprod = models["scheduler"].alphas_cumprod.float()
    gen = torch.Generator().manual_seed(cfg.seed + (6 if layout else 3))
    progress = LossLog(name, total, start)
    steps = Schedule(total, minutes).run(name, opt, lr, warmup)
    for step in steps:
        noisiest, from_t = layout_rows(cfg, step, len(alphas_cumprod)) if layout else (0, 0)
        z, ids = latent_batch(cfg, latents, batcher, gen, noisiest)
        loss = _denoiser_loss(cfg, unet, text_encoder, z, ids, alphas_cumprod, gen, noisiest, from_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema["unet"], unet, decay)
        ema_update(ema["text_encoder"], text_encoder, decay)
        progress.add(step, loss=loss.item())
        if layout and (step + 1) % 250 == 0:
            gaps = position_gaps(unet, text_encoder, models["tokenizer"], alphas_cumprod, cfg.device)
            print(f"[{name}] step {step + 1} first-step x0 gaps: " + " ".join(f"{k}={v:.4f}" for k, v in gaps.items()),
                  flush=True)
        if (step + 1) % cfg.save_every == 0:
            save_pipeline(out, {**models, **ema})
    return ema


def latent_batch(cfg: TrainConfig, latents, batcher: CaptionBatcher, gen, complete: int = 0) -> tuple:
    """Scaled latents drawn from each picked image's posterior, with freshly drawn captions (the first
    ``complete`` of them naming every attribute)."""
    means, stds, scaling = latents
    idx = torch.randint(len(means), (cfg.unet_batch,), generator=gen)
    z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)  # [B, 4, 16, 16]
    return z * scaling, batcher.ids(idx.tolist(), complete)


def layout_rows(cfg: TrainConfig, step: int, total: int = 1000) -> tuple[int, int]:
    """The layout phase's batch at ``step``: how many rows at the noisiest end (with complete captions), and the
    first timestep of that end: for the first ``layout_position_first`` steps every row at the pure-noise step
    (``total - 1``), then ``layout_share`` of them at t >= ``layout_from_t``."""
    if step < cfg.layout_position_first:
        return cfg.unet_batch, total - 1
    return round(cfg.unet_batch * cfg.layout_share), cfg.layout_from_t


def draw_timesteps(n: int, total: int, gen, noisiest: int = 0, from_t: int = 900) -> torch.Tensor:
    """Uniform training timesteps, the first ``noisiest`` of them at t >= ``from_t``."""
    t = torch.randint(0, total, (n,), generator=gen)
    t[:noisiest] = torch.randint(from_t, total, (noisiest,), generator=gen)
    return t


def _denoiser_loss(cfg, unet, text_encoder, z, ids, alphas_cumprod, gen, noisiest: int = 0,
                   from_t: int = 0) -> torch.Tensor:
    """Timesteps and noise are drawn on the CPU from ``gen`` (the same numbers on any device), then moved.
    The first ``noisiest`` rows at t >= ``from_t`` with an x0-space weight of 1 (the layout phase)."""
    dev = cfg.device
    t = draw_timesteps(len(z), len(alphas_cumprod), gen, noisiest, from_t)
    noise = torch.randn(z.shape, generator=gen).to(dev)
    z, ids, t = z.to(dev), ids.to(dev), t.to(dev)
    a = alphas_cumprod.to(dev)[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * z + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * z if cfg.prediction_type == "v_prediction" else noise
    with autocast(cfg.unet_bf16, dev):
        context = text_encoder(ids)[0]  # [B, L, 128], last hidden state as SD pipelines use it
        pred = unet(noisy, t, encoder_hidden_states=context).sample.float()
    per_item = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    weights = min_snr_weights(alphas_cumprod.to(dev), t, cfg.min_snr_gamma, cfg.prediction_type,
                              cfg.min_snr_floor)
    weights[:noisiest] = min_snr_weights(alphas_cumprod.to(dev), t[:noisiest], cfg.min_snr_gamma,
                                         cfg.prediction_type, floor=1.0)
    return (per_item * weights).mean()


def grow_unet(unet, levels: int):
    """The UNet with a 2x2 level added (``levels`` 4), every weight of the trained one kept where the bigger one
    has it: the down blocks, the mid block (now at 2x2), and the up blocks one level further up (the 4-level
    UNet's up blocks 1-3 take the same inputs as the 3-level one's 0-2). New: the third level's downsampler,
    the 2x2 down block and the 2x2 up block, freshly initialised."""
    have = len(unet.config.block_out_channels)
    if levels <= have:
        return unet
    if (have, levels) != (3, 4):
        raise ValueError(f"can grow a 3-level UNet to 4 levels, not {have} to {levels}")
    grown = build_unet(levels)
    state = grown.state_dict()
    for key, value in unet.state_dict().items():
        if key.startswith("up_blocks."):
            _, index, rest = key.split(".", 2)
            key = f"up_blocks.{int(index) + 1}.{rest}"
        if state[key].shape != value.shape:
            raise ValueError(f"growing the UNet: {key} is {tuple(value.shape)}, expected {tuple(state[key].shape)}")
        state[key] = value
    grown.load_state_dict(state)
    return grown.to(next(unet.parameters()).dtype)


def pure_noise_x0(unet, text_encoder, noisy: torch.Tensor, ids: torch.Tensor, alphas_cumprod) -> torch.Tensor:
    """The x0 a v-prediction UNet predicts at the last training timestep (pure noise, where a sampler starts)."""
    last = len(alphas_cumprod) - 1
    a = alphas_cumprod[last].to(noisy.device)
    t = torch.full((len(noisy),), last, device=noisy.device)
    v = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
    return a.sqrt() * noisy - (1 - a).sqrt() * v


@torch.no_grad()
def position_gaps(unet, text_encoder, tokenizer, alphas_cumprod, device: str = "cpu", noises: int = 16) -> dict:
    """How far apart the first-step x0 predictions (timestep 999, the same ``noises`` noises) are for "a large red
    circle on the left" vs "on the right" (``lr``) and "at the top" vs "at the bottom" (``tb``), with a blue
    background, and for "on the left" vs "on the right" alone (``lr_alone``): mean |difference| over latent
    pixels. A model that ignores the position word scores ~0."""
    was_training = unet.training
    unet.eval()
    text_encoder.eval()
    noise = torch.randn(noises, 4, unet.config.sample_size, unet.config.sample_size,
                        generator=torch.Generator().manual_seed(5)).to(device)
    phrase = {p: shapes_data._POSITION_PHRASES[p][0] for p in ("left", "right", "top", "bottom")}
    captions = {p: f"a large red circle {words}, blue background" for p, words in phrase.items()}
    captions.update({"left alone": phrase["left"], "right alone": phrase["right"]})
    x0 = {}
    for name, text in captions.items():
        ids = tokenizer(text, padding="max_length", max_length=MODEL_MAX_LENGTH, return_tensors="pt").input_ids
        x0[name] = pure_noise_x0(unet, text_encoder, noise, ids.to(device).expand(noises, -1), alphas_cumprod).mean(0)
    unet.train(was_training)
    text_encoder.train(was_training)
    pairs = {"lr": ("left", "right"), "tb": ("top", "bottom"), "lr_alone": ("left alone", "right alone")}
    return {gap: (x0[one] - x0[other]).abs().mean().item() for gap, (one, other) in pairs.items()}


def train_layout_of(cfg: TrainConfig, folder: Path, out: Path) -> None:
    """Phase 3 alone, on a model folder this command wrote (its VAE, tokenizer, text encoder and UNet)."""
    from diffusers import StableDiffusionPipeline

    start = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    images, scenes = shapes_data.make_dataset(cfg.num_images, cfg.seed)
    vae = pipe.vae.float().to(cfg.device).eval()
    means, stds = encode_all(vae, images, cfg.vae_bf16, cfg.device)
    models = {"vae": vae, "tokenizer": pipe.tokenizer, "scheduler": build_scheduler(cfg.prediction_type,
                                                                                     cfg.zero_terminal_snr),
              "unet": pipe.unet.float().to(cfg.device), "text_encoder": pipe.text_encoder.float().to(cfg.device)}
    batcher = CaptionBatcher(pipe.tokenizer, scenes, cfg)
    ema = train_denoiser(cfg, models, (means, stds, vae.config.scaling_factor), batcher, out, start, layout=True)
    save_pipeline(out, {**models, **ema})
    print(f"saved {out} in {(time.time() - start) / 60:.1f} min", flush=True)


# ---------------------------------------------------------------------------------------------- output

def save_pipeline(out: Path, models: dict) -> None:
    """Write a standard SD folder: float16 UNet/VAE, float32 text encoder (transformers loads weights in
    their stored dtype, and a float16 text encoder would not match a float32 UNet)."""
    from diffusers import StableDiffusionPipeline

    tmp = Path(tempfile.mkdtemp(prefix="shapes-", dir=out.parent))
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(models["vae"]).cpu().half(), text_encoder=copy.deepcopy(models["text_encoder"]).cpu(),
        tokenizer=models["tokenizer"], unet=copy.deepcopy(models["unet"]).cpu().half(),
        scheduler=models["scheduler"], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    from transformers import CLIPTokenizer

    cfg = _parse(argv)
    out = Path(cfg.pop("out")).resolve()
    decoder_only = cfg.pop("finetune_decoder_of")
    vae_from = cfg.pop("vae_from")
    layout_of = cfg.pop("layout_of")
    cfg = TrainConfig(**cfg)
    try:
        cfg.device = str(resolve_device(cfg.device))
    except ModelLoadError as exc:
        raise SystemExit(f"python -m diffbatch.training.shapes: error: {exc}") from None
    torch.set_num_threads(cfg.threads)
    if decoder_only:
        finetune_saved_decoder(cfg, Path(decoder_only))
        return 0
    if layout_of:
        train_layout_of(cfg, Path(layout_of), out)
        return 0
    print("config:", asdict(cfg), flush=True)
    start = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    images, scenes = shapes_data.make_dataset(cfg.num_images, cfg.seed)
    print(f"data: {len(images)} images in {time.time() - start:.0f}s", flush=True)
    if vae_from:  # phases 1-2 done by an earlier run: its (whitened) VAE, as saved
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae").float().to(cfg.device).eval()
        means, stds = encode_all(vae, images, cfg.vae_bf16, cfg.device)
    else:
        vae = train_vae(cfg, images, start)
        means, stds = encode_all(vae, images, cfg.vae_bf16, cfg.device)
        means, stds = whiten_latents(vae, means, stds, torch.Generator().manual_seed(cfg.seed + 4))
    sampled = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(cfg.seed))
    scaling = 1.0 / sampled.std().item()
    vae.register_to_config(scaling_factor=scaling)
    print(f"latents: std={sampled.std().item():.4f} mean={sampled.mean().item():.4f} "
          f"posterior std={stds.mean().item():.4f} -> scaling_factor={scaling:.4f}", flush=True)
    if not vae_from:
        vae = finetune_decoder(cfg, vae, images, start)
    tok_dir = Path(tempfile.mkdtemp(prefix="shapes-tokenizer-"))
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tok_dir, shapes_data.caption_vocabulary()))
    models = {"vae": vae, "tokenizer": tokenizer, "unet": build_unet(cfg.unet_levels).to(cfg.device),
              "scheduler": build_scheduler(cfg.prediction_type, cfg.zero_terminal_snr),
              "text_encoder": build_text_encoder(len(tokenizer), tokenizer.bos_token_id,
                                                 tokenizer.eos_token_id).to(cfg.device)}
    _report_sizes(models)
    batcher = CaptionBatcher(tokenizer, scenes, cfg)
    ema = train_denoiser(cfg, models, (means, stds, scaling), batcher, out, start)
    if cfg.layout_steps:
        ema = train_denoiser(cfg, {**models, **ema}, (means, stds, scaling), batcher, out, start, layout=True)
    save_pipeline(out, {**models, **ema})
    print(f"saved {out} in {(time.time() - start) / 60:.1f} min total", flush=True)
    return 0


def _report_sizes(models: dict) -> None:
    for name in ("vae", "text_encoder", "unet"):
        count = sum(p.numel() for p in models[name].parameters())
        print(f"{name}: {count / 1e6:.2f}M parameters", flush=True)


def _parse(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m diffbatch.training.shapes", description=__doc__)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: package data)")
    parser.add_argument("--finetune-decoder-of", metavar="DIR",
                        help="only run the decoder phase on a saved model folder, rewriting it")
    parser.add_argument("--vae-from", metavar="DIR",
                        help="skip the VAE phases: take the VAE of a model folder this command wrote "
                             "(phases 1-2 of an earlier run) and train the text encoder and UNet on it")
    parser.add_argument("--layout-of", metavar="DIR",
                        help="only run the layout phase on a model folder this command wrote, writing --out")
    for field, default in asdict(TrainConfig()).items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        parser.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, default=default,
                            help=f"default: {default}")
    return vars(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
