"""Which model stages give a row different bits with its batch size or the thread count, on this machine?

For each stage (text encoder, denoiser, VAE encode, VAE decode) of a model, row i of a call of N rows is
compared with row i of the reference call (N = 8, 1 thread), for N in 2..8 and 1..4 threads, with
diffbatch's invariance kernels on and off. Run it on a new machine (another CPU, another PyTorch) before
trusting the determinism contract there; it is how adapters/invariance.py was built.

    python benchmarks/invariance_probe.py                  # the embedded shapes model
    python benchmarks/invariance_probe.py --model sd15     # the SD-1.5 architecture, random weights (slow)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from throughput import cpu_model, save_sd15_random  # noqa: E402

from diffbatch.adapters import load_adapter  # noqa: E402
from diffbatch.hardware import native_bfloat16  # noqa: E402

SIZES = (2, 3, 5, 8)
THREADS = (1, 2, 3, 4)


def stages(adapter, rows: int) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]]:
    """Each stage as a function of a batch of inputs (row-indexed), with ``rows`` random inputs."""
    pipe, size = adapter.pipe, adapter.defaults.height
    torch.manual_seed(0)
    latents = torch.randn(rows, pipe.unet.config.in_channels, size // pipe.vae_scale_factor,
                          size // pipe.vae_scale_factor)
    unet_latents, vae_latents = latents.to(pipe.unet.dtype), latents.to(pipe.vae.dtype)
    tokens = pipe.tokenizer([f"a shape number {i}" for i in range(rows)], padding="max_length",
                            max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    context = pipe.text_encoder(tokens)[0]
    pixels = (torch.rand(rows, 3, size, size) * 2 - 1).to(pipe.vae.dtype)
    timesteps = torch.linspace(999, 1, rows)
    idx = torch.arange(rows)
    return {
        "text encoder": (lambda i: pipe.text_encoder(tokens[i])[0], idx),
        "denoiser": (lambda i: pipe.unet(unet_latents[i], timesteps[i], encoder_hidden_states=context[i])[0], idx),
        "VAE encode": (lambda i: pipe.vae.encode(pixels[i]).latent_dist.mean, idx),
        "VAE decode": (lambda i: pipe.vae.decode(vae_latents[i])[0], idx),
    }


def probe(model: str | None, invariant: bool, dtype: str = "float32") -> dict[str, list[tuple[int, int]]]:
    """Per stage: the (threads, N) pairs where some row differs from the reference."""
    adapter = load_adapter(model, "cpu", dtype, invariant=invariant)
    found: dict[str, list[tuple[int, int]]] = {}
    with torch.inference_mode(), torch.autocast("cpu", enabled=False):
        for name, (fn, idx) in stages(adapter, max(SIZES)).items():
            torch.set_num_threads(1)
            reference = fn(idx)
            found[name] = [(t, n) for t in THREADS for n in SIZES if not _rows_equal(fn, idx, reference, t, n)]
    return found


def _rows_equal(fn, idx, reference, threads: int, n: int) -> bool:
    torch.set_num_threads(threads)
    return all(torch.equal(fn(idx[start : start + n]), reference[start : start + n])
               for start in range(0, len(idx) - n + 1, n))


def fixed_row_gemms(shapes=((320, 1280), (1280, 1280), (1280, 320), (768, 768), (32, 128)), tries: int = 3) -> bool:
    """Whether a GEMM of exactly ``LINEAR_ROWS`` rows (how invariance.py runs ``[N, C]`` linears) gives a row the
    same bits at every position in the call, beside any other rows or zero padding, at 1-4 threads (float32 and
    bfloat16)."""
    from diffbatch.adapters.invariance import LINEAR_ROWS

    torch.manual_seed(0)
    for dtype, (cin, cout) in ((d, s) for d in (torch.float32, torch.bfloat16) for s in shapes):
        weight, bias, row = torch.randn(cout, cin, dtype=dtype), torch.randn(cout, dtype=dtype), torch.randn(cin)
        seen = set()
        for threads, position, k in ((t, p, k) for t in THREADS for p in range(LINEAR_ROWS) for k in range(tries)):
            torch.set_num_threads(threads)
            x = torch.randn(LINEAR_ROWS, cin, dtype=dtype)
            x[position] = row.to(dtype)
            if k % 2:
                x[position + 1 :] = 0  # zero padding after it, else other rows
            seen.add(torch.nn.functional.linear(x, weight, bias)[position].float().numpy().tobytes())
        if len(seen) != 1:
            return False
    return True


def lora_bmms(shapes=((4096, 320, 8, 320), (64, 1280, 16, 1280), (77, 768, 8, 768), (1, 1280, 64, 1280))) -> bool:
    """Whether the fused LoRA rows' batched GEMMs (lora.py: ``x_i @ A_i @ B_i`` for every row i in one pair of
    bmm calls) give a row the same bits at any batch count (2-9) and position, at 1-4 threads (float32 and
    bfloat16); shapes are (tokens, in, rank bucket, out)."""
    torch.manual_seed(0)
    for dtype, (tokens, cin, rank, cout) in ((d, s) for d in (torch.float32, torch.bfloat16) for s in shapes):
        rows = 9
        x = torch.randn(rows, tokens, cin, dtype=dtype)
        down, up = torch.randn(rows, cin, rank, dtype=dtype), torch.randn(rows, rank, cout, dtype=dtype)
        seen: dict[int, bytes] = {}
        for threads, n in ((t, n) for t in THREADS for n in (2, 3, 5, 8, 9)):
            torch.set_num_threads(threads)
            for start in range(0, rows - n + 1, n):
                out = torch.bmm(torch.bmm(x[start : start + n], down[start : start + n]), up[start : start + n])
                for i in range(n):
                    bits = out[i].float().numpy().tobytes()
                    if seen.setdefault(start + i, bits) != bits:
                        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("shapes", "sd15"), default="shapes")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    print(f"{cpu_model()}, torch {torch.__version__}, default threads {default_threads}")
    verdict = "every row identical" if fixed_row_gemms() else "ROWS DIFFER: the [N, C] linears are not exact"
    print(f"fixed-row GEMMs (invariance.py's LINEAR_ROWS) {verdict}")
    verdict = "every row identical" if lora_bmms() else "ROWS DIFFER: the fused LoRA rows are not exact"
    print(f"fused LoRA rows' batched GEMMs (lora.py) {verdict}")
    dtypes = ["float32"] + (["bfloat16"] if native_bfloat16() else [])  # every dtype this CPU runs natively
    with tempfile.TemporaryDirectory() as tmp:
        model = None if args.model == "shapes" else str(save_sd15_random(Path(tmp) / "sd15"))
        for dtype in dtypes:
            for invariant in (False, True):
                label = f"{dtype} " + ("invariance kernels" if invariant else "stock kernels")
                for stage, bad in probe(model, invariant, dtype).items():
                    verdict = "every row identical" if not bad else f"rows differ at (threads, N) {bad}"
                    print(f"{label:27s} {stage:12s} {verdict}", flush=True)

if __name__ == "__main__":
    main()
