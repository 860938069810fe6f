"""Engine behaviour beyond equivalence: admission errors, results, sizes."""

from __future__ import annotations

import pytest

from diffbatch import Engine, GenerationSpec, InputError, SpecError
from helpers import noise_image


@pytest.fixture(scope="module")
def engine(tiny_sd_path) -> Engine:
    return Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", max_batch_size=4)


def test_a_bad_spec_anywhere_in_the_list_is_refused_before_any_image_is_made(engine):
    specs = [GenerationSpec(prompt="ok", num_inference_steps=2), GenerationSpec(prompt="bad", height=33)]
    with pytest.raises(SpecError, match="height=33"):
        engine.generate(specs)
    assert not engine.has_unfinished()


def test_sampler_that_cannot_run_the_step_count_is_refused_at_admission(engine):
    with pytest.raises(SpecError, match="scheduler=pndm cannot run num_inference_steps=2"):
        engine.add_request(GenerationSpec(prompt="x", scheduler="pndm", num_inference_steps=2))


def test_missing_init_image_is_refused_naming_the_path(engine, tmp_path):
    with pytest.raises(InputError, match="missing.png"):
        engine.generate([GenerationSpec(prompt="x", image=tmp_path / "missing.png")])


def test_img2img_takes_its_size_from_the_init_image_and_accepts_a_path(engine, tmp_path):
    path = tmp_path / "init.png"
    noise_image(size=24).save(path)
    [result] = engine.generate([GenerationSpec(prompt="x", image=path, strength=0.5, num_inference_steps=4)])
    assert result.image.size == (24, 24) and result.spec.strength == 0.5


def test_results_carry_the_resolved_spec_and_time(engine):
    results = engine.generate([GenerationSpec(prompt="a", num_inference_steps=2)] * 3, base_seed=10)
    assert [r.spec.seed for r in results] == [10, 11, 12]
    assert all(r.seconds > 0 for r in results) and [r.index for r in results] == [0, 1, 2]
    assert results[0].spec.guidance_scale == 7.5 and results[0].spec.height == 32


def test_on_result_sees_every_image(engine):
    seen = []
    engine.generate([GenerationSpec(prompt=str(i), seed=i, num_inference_steps=1 + i) for i in range(5)],
                    on_result=seen.append)
    assert sorted(r.index for r in seen) == list(range(5))


def test_abort_drops_requests_mid_flight_and_the_others_finish(engine):
    ids = [engine.add_request(GenerationSpec(prompt=f"p{k}", seed=k, num_inference_steps=3)) for k in range(4)]
    engine.step()
    engine.abort(ids[1:3])
    finished = []
    while engine.has_unfinished():
        finished += [r.request_id for r in engine.step()]
    assert sorted(finished) == [ids[0], ids[3]] and engine.num_unfinished() == 0
    engine.add_request(GenerationSpec(prompt="later", seed=9, num_inference_steps=2))
    engine.abort()  # all
    assert not engine.has_unfinished()


def test_a_step_that_fails_leaves_none_of_its_requests_to_fail_the_next_generate(engine, monkeypatch):
    """A model call that raises (a bug, a device error) fails that generate call, not every later one."""
    execute = engine.runner.execute
    calls = iter([RuntimeError("device lost")])

    def failing(plan):  # noqa: ANN001, ANN202
        error = next(calls, None)
        if error is not None:
            raise error
        return execute(plan)

    monkeypatch.setattr(engine.runner, "execute", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate([GenerationSpec(prompt="a", seed=1, num_inference_steps=2)])
    assert not engine.has_unfinished()
    assert engine.generate([GenerationSpec(prompt="b", seed=2, num_inference_steps=2)])[0].image is not None
