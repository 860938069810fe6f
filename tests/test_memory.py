"""Memory-safe batch sizes: out-of-memory in a denoiser call or VAE decode splits the batch and loses nothing."""

from pathlib import Path

import numpy as np
import pytest
import torch

from diffbatch import Engine, GenerationSpec, memory
from diffbatch.cli import main
from diffbatch.memory import AUTO_CAP, SIMULATE_ENV, StageLimit, batch_limits, fit, is_out_of_memory

# Mixed CFG / no CFG, steps and samplers: rows of one call differ in every way the runner allows.
SPECS = [GenerationSpec(prompt=f"prompt {k % 3}", seed=k, num_inference_steps=2 + k % 3,
                        guidance_scale=1.0 if k % 2 else 7.5, scheduler="euler_a" if k % 4 == 1 else None)
         for k in range(7)]


def images(engine: Engine) -> list[np.ndarray]:
    return [np.asarray(r.image) for r in engine.generate(SPECS)]


@pytest.fixture(scope="module")
def reference(tiny_sd_path: Path) -> list[np.ndarray]:
    return images(Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8))


def test_oom_above_two_images_still_makes_every_image_identical_to_a_run_without_oom(
        tiny_sd_path: Path, reference: list[np.ndarray]) -> None:
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)
    limits, shape = engine.limits, (32, 32)
    limits.denoise.simulate_oom_above = 2
    got = images(engine)
    assert all(np.array_equal(a, b) for a, b in zip(got, reference, strict=True))
    assert limits.splits > 0 and limits.denoise(shape) == 2  # lowered for the rest of the run
    assert max(engine.stats.batch_sizes) == 7  # the first step planned all seven; the runner split it


def test_oom_in_vae_decode_splits_the_decode_and_loses_no_image(tiny_sd_path: Path) -> None:
    specs = [GenerationSpec(prompt=f"p{k}", seed=k, num_inference_steps=2) for k in range(5)]
    plain = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=8)
    engine.limits.decode.simulate_oom_above = 1  # the five finish together: one decode of 5 fails
    got = [np.asarray(r.image) for r in engine.generate(specs)]
    assert all(np.array_equal(a, np.asarray(b.image)) for a, b in zip(got, plain.generate(specs), strict=True))
    assert engine.limits.decode((32, 32)) == 1 and engine.limits.splits == 4


def test_oom_at_one_image_is_raised_not_retried_forever(tiny_sd_path: Path) -> None:
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=4)
    engine.limits.denoise.simulate_oom_above = 0
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        engine.generate(SPECS[:3])


def test_errors_other_than_oom_are_not_split() -> None:
    limits = batch_limits(4, "cpu", 4)
    calls: list[int] = []

    def fail(items: list[int]) -> list[int]:
        calls.append(len(items))
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        limits.run_split(limits.denoise, (8, 8), [1, 2, 3, 4], fail)
    assert calls == [4] and limits.splits == 0


def test_split_keeps_item_order_and_lowers_the_limit_to_what_fitted() -> None:
    limits = batch_limits(8, "cpu", 4)

    def fits_three(items: list[int]) -> list[int]:
        if len(items) > 3:
            raise RuntimeError("CUDA error: out of memory")
        return [x * 10 for x in items]

    assert limits.run_split(limits.denoise, (8, 8), list(range(7)), fits_three) == [x * 10 for x in range(7)]
    assert limits.denoise((8, 8)) == 2 and limits.denoise((16, 16)) == 8  # per shape


@pytest.mark.parametrize(("exc", "expected"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("MPS backend out of memory"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_is_recognised_by_type_or_message(exc: BaseException, expected: bool) -> None:
    assert is_out_of_memory(exc) is expected


def test_auto_fits_the_budget_and_stays_within_one_and_the_cap() -> None:
    assert fit(10 * 2**30, 2**30) == 10
    assert fit(2**20, 2**30) == 1
    assert fit(2**50, 1) == AUTO_CAP
    sd15 = memory.denoiser_bytes((512, 512), element_size=2)
    assert 1e9 < sd15 < 4e9 and memory.decoder_bytes((512, 512), 2) > sd15 / 2  # rough SD-1.5 float16 scale


def test_auto_estimates_once_per_shape_and_bigger_images_get_smaller_batches() -> None:
    calls: list[tuple[int, int]] = []
    limit = StageLimit(AUTO_CAP, lambda shape: calls.append(shape) or 2**20 // (shape[0] * shape[1]))
    assert limit((64, 64)) == AUTO_CAP and limit((512, 512)) == 4 and limit((512, 512)) == 4
    assert calls == [(64, 64), (512, 512)]
    assert batch_limits("auto", "cpu", 4).denoise((32, 32)) == AUTO_CAP  # a tiny image: the cap on any machine


def test_cli_batch_size_auto_with_simulated_oom_writes_every_image(
        capsys: pytest.CaptureFixture, tmp_path: Path, tiny_sd_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["generate", "--prompt", "a", "--prompt", "b", "-n", "3", "--model", str(tiny_sd_path), "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "plain"), "--batch-size", "6"]) == 0
    monkeypatch.setenv(SIMULATE_ENV, "1")
    assert main([*args, "--out", str(tmp_path / "oom")]) == 0, capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "plain").glob("0*.png"))
    assert len(names) == 6
    for name in names:
        assert (tmp_path / "oom" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_cli_rejects_a_batch_size_that_is_neither_auto_nor_positive(
        capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    for bad in ("0", "big"):
        assert main(["generate", "--prompt", "a", "--out", str(tmp_path / "o"), "--batch-size", bad]) == 2
        assert "--batch-size" in capsys.readouterr().err


def test_auto_on_cuda_divides_free_device_memory_by_the_per_image_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (10 * 2**30, 80 * 2**30))  # no GPU needed
    limits = batch_limits("auto", "cuda", element_size=2)
    budget = int(10 * 2**30 * memory.CUDA_FREE_FRACTION)
    assert limits.denoise((512, 512)) == budget // memory.denoiser_bytes((512, 512), 2) == 8
    assert limits.decode((512, 512)) == budget // memory.decoder_bytes((512, 512), 2) == 5
    assert limits.denoise((1024, 1024)) == 2
