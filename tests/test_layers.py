"""The model-call layers (adapters/layers.py): one ordered stack, backend < invariance < lora < step-cache, each
layer calling the ones below it, and one refusal where a backend lacks a layer."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from diffbatch import Engine, GenerationSpec, SpecError
from diffbatch.adapters import invariance, lora
from diffbatch.adapters.layers import ORDER, LayerStack
from diffbatch.adapters.loading import describe
from diffbatch.resolver import Resolver


def test_the_order_is_backend_invariance_lora_step_cache():
    assert ORDER == ("backend", "invariance", "lora", "step-cache")


def test_an_engine_installs_its_layers_in_order_and_a_lora_calls_the_invariant_kernels(tmp_path, tiny_sd_path):
    pytest.importorskip("peft", reason="PEFT is not installed (pip install -e '.[lora]')")
    from peft.tuners.lora import LoraLayer

    from tiny_lora import save_random_lora  # imports PEFT

    save_random_lora(StableDiffusionPipeline, tiny_sd_path, tmp_path / "a.safetensors", seed=1, rank=4, alpha=8.0)
    engine = Engine.from_pretrained(tiny_sd_path, device="cpu", dtype="float32", lora_dir=tmp_path)
    assert engine.adapter.layers.installed == ["backend", "invariance"]
    engine.generate([GenerationSpec(prompt="a red circle <lora:a:0.5>", seed=1, num_inference_steps=2, height=32,
                                    width=32)])
    assert engine.adapter.layers.installed == ["backend", "invariance", "lora"]
    layers = [m for m in engine.adapter.pipe.unet.modules() if isinstance(m, LoraLayer) and hasattr(m, "lora_A")]
    assert layers
    for layer in layers:  # layer 3 on top of layer 2: the row-wise LoRA forward, its base and A/B invariant
        assert layer.forward.__func__ is lora._rowwise_forward
        inner = [layer.base_layer, *layer.lora_A.values(), *layer.lora_B.values()]
        assert all(m.forward.__func__ is invariance._bucketed_linear for m in inner if type(m).__name__ == "Linear")


def test_a_layer_is_never_installed_over_one_above_it():
    stack = LayerStack("torch")
    ran = []
    for name in ("backend", "invariance", "lora", "lora"):  # a layer may install again (LoRA: every load)
        stack.install(name, lambda name=name: ran.append(name))
    assert ran == ["backend", "invariance", "lora", "lora"] and stack.installed == ["backend", "invariance", "lora"]
    with pytest.raises(RuntimeError, match="'invariance' installed after 'lora'"):
        stack.install("invariance", lambda: ran.append("again"))
    assert ran[-1] == "lora"  # refused before it patched anything


@pytest.mark.parametrize(("field", "value"), [("loras", {"a": 1.0}), ("cache", "deepcache:3")])
def test_a_backend_without_a_layer_refuses_the_request_in_one_line(field, value):
    # configuration only, as the --ray driver resolves (Resolver.for_model): the refusal needs no OpenVINO
    resolver = Resolver(describe(None, backend="openvino"))
    resolver.lora_path = Path  # every LoRA name found: the refusal under test comes after the file lookup
    with pytest.raises(SpecError, match=f"^{field}=.*not supported with backend 'openvino'.*use backend torch"
                       ) as caught:
        resolver.resolve(GenerationSpec(prompt="a red circle", seed=1, **{field: value}))
    assert caught.value.field == field and "\n" not in str(caught.value)
    assert resolver.resolve(GenerationSpec(prompt="x", seed=1, cache="auto")).cache == "off"


def test_a_linear_over_few_tokens_a_row_gives_each_row_the_same_bits_in_any_call():
    """Attention at a 2x2 or 1x2 latent level (the embedded model's 4th level) runs ``[N, L, C]`` linears with
    L < 16, whose stock GEMM kernel moved a row's bits between N = 2 and N = 3 on the development CPU."""
    import torch

    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 128, bias=False)  # as attention's to_q/to_k/to_v
    invariance.make_batch_invariant([layer], torch.device("cpu"))
    x = torch.randn(20, 2, 128)
    pairs = [layer(x[i : i + 2]) for i in range(19)]  # each row at both positions of a two-row call
    for n in (3, 5, 8, 13, 20):
        out = layer(x[:n])
        for i in range(n - 1):
            assert torch.equal(out[i : i + 2], pairs[i]), (n, i)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight), atol=1e-5)
