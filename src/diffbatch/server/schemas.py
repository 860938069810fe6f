"""HTTP request bodies (pydantic lives only here, at the edge) and OpenAI-style errors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class ImageGenerationRequest(BaseModel):
    """OpenAI's ``POST /v1/images/generations`` body, plus diffbatch's extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: StrictInt = 1  # strict: JSON true or 1.0 is not a count
    size: str | None = None  # "WxH" or "auto"; default: the model's native size
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None
    quality: str | None = None  # OpenAI fields accepted for client compatibility, without effect
    style: str | None = None
    # Extensions
    seed: StrictInt | None = None  # image i of the request gets seed + i
    negative_prompt: str = ""
    num_inference_steps: StrictInt | None = None
    guidance_scale: float | None = None
    guidance_rescale: float | None = None
    scheduler: str | None = None
    request_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,80}$")  # POST /v1/images/cancel names it
    variation_seed: StrictInt | None = None  # with variation_strength in [0, 1]: AUTOMATIC1111's subseed
    variation_strength: float | None = None
    loras: dict[str, float] = Field(default_factory=dict)  # LoRA name -> weight (names from --lora-dir)


class CancelRequest(BaseModel):
    """``POST /v1/images/cancel``: the ``request_id`` a generation was sent with."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,80}$")


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


# OpenAPI descriptions of the bodies the routes read themselves (multipart forms, JSON lines): the schema tells
# clients (and the schemathesis run in the tests) what to send, and the routes check it as before.
def _form(properties: dict, required: list[str]) -> dict:
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": properties, "required": required,
                   "additionalProperties": False}}}}}


_IMAGE = {"type": "string", "format": "binary"}
_TEXT, _INT, _NUMBER = {"type": "string"}, {"type": "integer"}, {"type": "number"}
EDIT_BODY = _form({"image": _IMAGE, "prompt": _TEXT, "strength": _NUMBER, "n": _INT, "size": _TEXT, "seed": _INT,
                   "negative_prompt": _TEXT, "num_inference_steps": _INT, "guidance_scale": _NUMBER,
                   "scheduler": _TEXT, "response_format": {"type": "string", "enum": ["b64_json", "url"]}},
                  ["image", "prompt"])
PARAMETERS_BODY = _form({"image": _IMAGE}, ["image"])
BATCH_BODY = {"requestBody": {"required": True, "content": {"application/jsonl": {"schema": {
    "type": "array", "description": "one JSON object per line, with any GenerationSpec field",
    "items": {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
        "prompt": _TEXT, "negative_prompt": _TEXT, "seed": _INT, "num_inference_steps": _INT,
        "guidance_scale": _NUMBER, "width": _INT, "height": _INT, "scheduler": _TEXT,
        "loras": {"type": "object", "additionalProperties": _NUMBER}}}}}}}}
