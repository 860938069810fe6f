"""The anchor for the fast CPU path (issue 12): OpenVINO GenAI's ``Text2ImagePipeline`` on the same weights
as diffbatch, on a multi-prompt batch (every image its own prompt and seed, same steps, guidance and size).
GenAI takes one prompt per ``generate`` call (``num_images_per_prompt`` batches only copies of one prompt),
so a multi-prompt batch is one call per image there; diffbatch batches them.

Two sides, run by ``benchmarks/anchor_genai.sh`` (which keeps GenAI and optimum-intel in a throwaway venv,
away from diffbatch's pins):

    python benchmarks/anchor_genai.py save DIR                 # SD-1.5 architecture, random weights
    GENAI_PY benchmarks/anchor_genai.py genai DIR OUT.json     # optimum-cli export, then GenAI
    python benchmarks/anchor_genai.py diffbatch DIR OUT.json   # diffbatch, torch and OpenVINO backends
    python benchmarks/anchor_genai.py diffbatch DIR OUT.json torch-bfloat16   # just that configuration
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = 8
STEPS = 5
SIZE = 256
GUIDANCE = 7.5


def prompts() -> list[str]:
    return [f"a photo of thing number {k}" for k in range(PROMPTS)]


def save(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from throughput import save_sd15_random

    save_sd15_random(folder)


def genai(folder: Path, out: Path) -> None:
    import openvino_genai

    exported = folder.with_name(folder.name + "-openvino")
    if not (exported / "model_index.json").is_file():
        subprocess.run(["optimum-cli", "export", "openvino", "--model", str(folder), "--task", "text-to-image",
                        "--weight-format", "fp32", str(exported)], check=True)
    pipe = openvino_genai.Text2ImagePipeline(str(exported), "CPU")
    pipe.generate(prompts()[0], width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  rng_seed=0)  # warm-up
    began = time.perf_counter()
    for k, prompt in enumerate(prompts()):
        pipe.generate(prompt, width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, rng_seed=k)
    seconds = time.perf_counter() - began
    out.write_text(json.dumps({"genai": {"seconds": round(seconds, 2), "images_per_s": round(PROMPTS / seconds, 3),
                                         "openvino_genai": openvino_genai.__version__}}, indent=2))


def diffbatch_side(folder: Path, out: Path, only: str = "") -> None:
    from diffbatch import Engine, GenerationSpec
    from diffbatch.hardware import native_bfloat16

    specs = [GenerationSpec(prompt=p, seed=k, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                            width=SIZE) for k, p in enumerate(prompts())]
    found = {}
    settings = {"diffbatch torch float32": dict(dtype="float32"),
                "diffbatch openvino float32": dict(dtype="float32", backend="openvino")}
    if native_bfloat16():
        settings["diffbatch torch bfloat16 (dtype auto here)"] = dict(dtype="bfloat16")
        settings["diffbatch openvino bfloat16"] = dict(dtype="bfloat16", backend="openvino")
    if only:
        settings = {name: kwargs for name, kwargs in settings.items() if only.replace("-", " ") in name}
    for name, kwargs in settings.items():
        engine = Engine.from_pretrained(folder, device="cpu", max_batch_size=8, **kwargs)
        engine.generate(specs[:1])
        began = time.perf_counter()
        engine.generate(specs)
        seconds = time.perf_counter() - began
        found[name] = {"seconds": round(seconds, 2), "images_per_s": round(PROMPTS / seconds, 3)}
        del engine
    out.write_text(json.dumps(found, indent=2))


if __name__ == "__main__":
    side, folder = sys.argv[1], Path(sys.argv[2])
    if side == "save":
        save(folder)
    elif side == "genai":
        genai(folder, Path(sys.argv[3]))
    else:
        diffbatch_side(folder, Path(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "")
