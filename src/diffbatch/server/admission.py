"""One admission policy for every way work enters the server: online generations, edits (whose size may come
from the uploaded image), batch-job lines and the UI (which calls the same endpoints). Everything is checked
before anything is queued: the text lengths before the spec is resolved (resolving reads the prompt), the
size and steps on the resolved spec (defaults and the init image's size filled in), and a batch job's total
cost against a budget. A refusal is an ``ApiError`` 400 naming the field (and, for a batch, the line)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..hires import hires_size, run_steps
from ..spec import GenerationSpec
from .config import ServerConfig
from .schemas import ApiError

TEXT_FIELDS = ("prompt", "negative_prompt", "hires_prompt", "hires_negative_prompt")
MEGA = 1_000_000


@dataclass(frozen=True)
class Policy:
    max_n: int  # images per request
    max_side: int  # pixels, width and height
    max_steps: int  # denoising steps per image
    max_prompt_chars: int  # prompt and negative prompt, each
    max_job_cost: float  # a batch job's images x steps x megapixels
    max_job_text_bytes: int = 64 * 1024 * 1024  # a batch job's prompts, stored with every image (store.py)

    @classmethod
    def of(cls, config: ServerConfig) -> Policy:
        return cls(config.max_n, config.max_side, config.max_steps, config.max_prompt_chars, config.max_job_cost,
                   config.max_job_text_bytes)

    def check_count(self, n: Any) -> None:
        bound("n", n, 1, self.max_n)

    def check_text(self, fields: dict[str, Any], where: str = "") -> None:
        """Before resolving: each text field a string within the length limit."""
        for name in TEXT_FIELDS:
            value = fields.get(name)
            if isinstance(value, str) and len(value) > self.max_prompt_chars:
                raise ApiError(400, f"{where}{name}: {len(value)} characters; this server's limit is "
                                    f"{self.max_prompt_chars}", name)

    def check_resolved(self, spec: GenerationSpec, where: str = "", size_from: str | None = None) -> None:
        """After resolving: the steps and the size the image will really have. ``size_from``: the field that
        set the size, named in the refusal (``size`` online, ``image`` where an edit's size came from its
        upload); None: ``width`` or ``height``, whichever is over (a batch line's fields). The text was checked
        before resolving (``check_text``); resolving only shortens it (LoRA tags leave the prompt)."""
        bound("num_inference_steps", spec.num_inference_steps, 1, self.max_steps, where)
        bound("hires_steps", spec.hires_steps, 0, self.max_steps, where)
        width, height = spec.width or 0, spec.height or 0
        if max(width, height) > self.max_side:
            name = size_from or ("width" if width > self.max_side else "height")
            raise ApiError(400, f"{where}{name}: {width}x{height} is over this server's limit of "
                                f"{self.max_side} pixels a side", name)
        if spec.hires_scale:
            height, width = _hires(spec)
            if max(width, height) > self.max_side:
                raise ApiError(400, f"{where}hires_scale: {spec.hires_scale} makes {width}x{height}, over this "
                                    f"server's limit of {self.max_side} pixels a side", "hires_scale")

    def check_job(self, specs: Iterable[GenerationSpec]) -> None:
        """A batch job's total cost (images x steps x megapixels) and its prompts' bytes (each image's row holds
        its prompts: a 100,000-image job of 4,000-character prompts is 0.8 GB on disk) within the budgets; the
        refusal names the line that takes it over."""
        total, text = 0.0, 0
        for number, spec in enumerate(specs, start=1):
            total += cost(spec)
            if total > self.max_job_cost:
                raise ApiError(400, f"line {number}: the job's cost reaches {total:,.0f} image-step-megapixels "
                                    f"there; this server's budget per job is {self.max_job_cost:,.0f} "
                                    "(split the job, or use fewer steps or smaller images)", "body")
            text += sum(len((getattr(spec, name) or "").encode("utf-8", "surrogatepass")) for name in TEXT_FIELDS)
            if text > self.max_job_text_bytes:
                raise ApiError(400, f"line {number}: the job's prompts reach {text:,} bytes there; this server's "
                                    f"budget per job is {self.max_job_text_bytes:,} (split the job, or use shorter "
                                    "prompts)", "body")


def cost(spec: GenerationSpec) -> float:
    """Denoising work of a resolved spec: steps run (an edit runs ``strength`` of them) x megapixels; hires fix
    adds its second pass (its steps at the larger size)."""
    steps = spec.num_inference_steps * (spec.strength if spec.is_img2img else 1.0)
    total = steps * (spec.width or 0) * (spec.height or 0) / MEGA
    if spec.hires_scale:  # A1111's hires steps: all of them run (hires.py)
        height, width = _hires(spec)
        total += run_steps(spec) * width * height / MEGA
    return total


def _hires(spec: GenerationSpec) -> tuple[int, int]:
    """The second pass's size before its cut to the model's VAE grid: the real one or a little more (a bound)."""
    return hires_size(spec.height or 0, spec.width or 0, spec.hires_scale, 1)


def bound(name: str, value: Any, low: int, high: int, where: str = "") -> None:
    if value is not None and not low <= value <= high:
        raise ApiError(400, f"{where}{name}: {value} is out of range [{low}, {high}]", name)
