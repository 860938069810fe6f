"""Step caches per row: two ways to skip most of the denoiser on some steps, each decided by one request from
its own state, so a row's result never depends on another row.

**DeepCache** (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free", arXiv:2312.00858) on a
``UNet2DConditionModel``: the UNet's deep features change slowly between denoising steps, so a request computes
them every N steps (a full call) and in between runs only the shallow path around them. Unlike the DeepCache
package's uniform schedule, the first fifth and the last tenth of a request's steps are all full
(``Request.reuses_deep``): early steps set the layout and late ones the detail, and with an ancestral sampler a
uniform schedule lands on another image (13 dB PSNR against the uncached one at N=3, 30 steps; 32 dB so).

The cut: the deep features are the input of the last up block (everything between the first down block and the
last up block, upsampled). The shallow path is the time embedding, ``conv_in``, the first down block, the last up
block on the cached features, and ``conv_out``: in every diffusers UNet the last up block has one resnet more
than the first down block, and its skip connections are ``conv_in``'s output and that block's resnets' outputs.
Measured ~12% of a forward on the embedded model (DESIGN.md; benchmarks/cache.py measures it again), so
refreshing every 3rd step bounds the denoiser's gain near 2.4x. The DeepCache package's SD helper cuts inside
these two blocks by default (``cache_branch_id=0``: it recomputes only the first resnet of the first down block
and the last of the last up block): a shorter shallow path, more reused, less exact. We cut at the block
boundary (whole diffusers blocks), which on the embedded model is close to the shortest path anyway (its first
down block and last up block are 2.6% and 8.7% of a forward).

Rows stay independent: the full call is the UNet's own forward, observed (``capture``), never changed; the
shallow call runs the same (batch-invariant) modules as the full one, and with fresh features gives exactly
the full call's output. Each row carries its own cached features, so a row's result never depends on another's.

**First-Block-Cache** (ParaAttention's, as diffusers' ``FirstBlockCacheConfig`` runs it) on the transformer
families (SD3, Flux): every step runs the embeddings and the first transformer block; when the first block's
residual (its output minus its input) changed, relative to the one of the request's last full step, by less than
the threshold, the other blocks are skipped and what they added at that full step is added instead. diffusers
decides once per batch (a mean over all rows, one ``.item()``); here each request decides over its own rows
(``first_block_changed``), which is exactly diffusers' decision for that request run alone, so diffusers' own
hook on a one-image pipeline is the oracle (tests/test_cache.py). The stages are the family's forward cut in
two (``FlowMatchAdapter.denoise_first`` / ``denoise_rest``): the rows whose first block changed run the other
blocks in one call, the rest add their cached residual in another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def capture(unet: Any, into: list[torch.Tensor]) -> Iterator[None]:
    """Append to ``into`` the deep features (``[N, C, h, w]``) of each UNet call made inside: the input of the
    last up block, read by a hook that changes nothing."""

    def keep(module: Any, args: tuple, kwargs: dict) -> None:
        into.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handle = unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def shallow_forward(unet: Any, sample: torch.Tensor, timestep: torch.Tensor, deep: torch.Tensor,
                    encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                    timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's output with its deep part replaced by ``deep`` (``[N, C, h, w]``, from ``capture``): the steps of
    ``UNet2DConditionModel.forward`` (diffusers 0.42) that the last up block depends on, in its order and with its
    arguments, so that fresh features give the full forward's bits."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = _time_embedding(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                               added_cond_kwargs=added_cond_kwargs)
    hidden = unet.conv_in(sample)  # [N, C0, h, w]
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    _, res = first(hidden_states=hidden, temb=emb, **_attention_kwargs(first, encoder_hidden_states))
    skips = ((hidden, *res))[: len(last.resnets)]  # the forward hands the last up block the first skips
    out = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, upsample_size=None,
               **_attention_kwargs(last, encoder_hidden_states))
    if unet.conv_norm_out:
        out = unet.conv_act(unet.conv_norm_out(out))
    return unet.conv_out(out)


def _time_embedding(unet: Any, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    added_cond_kwargs: dict[str, torch.Tensor] | None, timestep_cond: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Step 1 of the forward ("time"), with an LCM-distilled UNet's guidance embedding (``timestep_cond``), without
    class labels (no adapter passes them)."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug if aug is not None else emb
    return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


def _attention_kwargs(block: Any, encoder_hidden_states: torch.Tensor) -> dict[str, Any]:
    """What the forward passes a block with cross-attention (masks and attention kwargs: None, as ours are)."""
    if not getattr(block, "has_cross_attention", False):
        return {}
    return {"encoder_hidden_states": encoder_hidden_states, "attention_mask": None, "cross_attention_kwargs": None,
            "encoder_attention_mask": None}


def first_block_changed(probe: torch.Tensor, previous: torch.Tensor | None, threshold: float) -> bool:
    """First-Block-Cache's decision for one request (its rows, ``[n, ...]``): whether its first block's residual
    ``probe`` moved, since ``previous`` (the one at its last full step), by more than ``threshold`` relative —
    diffusers' ``_should_compute_remaining_blocks``. The means run in float64, so the reduction order (thread
    count) would have to land a ratio within ~1e-15 of the threshold to flip a decision."""
    if previous is None:
        return True
    moved = (probe.double() - previous.double()).abs().mean()
    return bool((moved / previous.double().abs().mean()).item() > threshold)
