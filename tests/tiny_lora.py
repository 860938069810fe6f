"""Random LoRAs for the tiny test pipelines, saved as diffusers writes them (and one with kohya key names)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def save_random_lora(pipe_class, model: Path, out: Path, seed: int, unet: bool = True, text: bool = False,
                     rank: int = 4, alpha: float = 8.0) -> Path:
    """A LoRA with random A and B (PEFT's ``init_lora_weights=False``) on the UNet and/or the text encoder."""
    pipe = pipe_class.from_pretrained(model)
    torch.manual_seed(seed)
    layers = {}
    if unet:
        pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS,
                                         init_lora_weights=False), adapter_name="x")
        layers["unet_lora_layers"] = get_peft_model_state_dict(pipe.unet, adapter_name="x")
    if text:
        pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS,
                                                 init_lora_weights=False), adapter_name="x")
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder, adapter_name="x")
    out.parent.mkdir(parents=True, exist_ok=True)
    pipe_class.save_lora_weights(out.parent, weight_name=out.name, safe_serialization=True, **layers)
    return out


def to_kohya(diffusers_file: Path, out: Path, alpha: float) -> Path:
    """The same UNet LoRA under kohya's (AUTOMATIC1111's) key names: lora_unet_<path with _>.lora_down/up, alpha."""
    kohya = {}
    for key, value in load_file(diffusers_file).items():
        assert key.startswith("unet."), key
        module, kind = key[len("unet."):].rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(kohya, out)
    return out
