"""HTTP request bodies (pydantic lives only here, at the edge) and OpenAI-style errors. The spec's fields are
not named here: the generations body, the edits form and the OpenAPI descriptions are built from spec.EDGES."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model

from ..spec import BODY, EDGES, EDITS, PARSE, GenerationSpec, Kind

REQUEST_ID = r"^[A-Za-z0-9_-]{1,80}$"
BODY_FIELDS = tuple(name for name, edges in EDGES.items() if edges.http == BODY)  # generations JSON and edits form
FORM_FIELDS = tuple(name for name, edges in EDGES.items() if edges.http in (BODY, EDITS))  # the edits form
BATCH_FIELDS = tuple(name for name in EDGES if name != "image")  # a batch line has no upload: routes refuse it


class OpenAIImageRequest(BaseModel):
    """OpenAI's own fields of ``POST /v1/images/generations``; ``ImageGenerationRequest`` adds the spec's."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: StrictInt = 1  # strict: JSON true or 1.0 is not a count
    size: str | None = None  # "WxH" or "auto"; default: the model's native size
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None
    quality: str | None = None  # OpenAI fields accepted for client compatibility, without effect
    style: str | None = None
    request_id: str | None = Field(None, pattern=REQUEST_ID)  # POST /v1/images/cancel names it


_JSON_TYPES: dict[Kind, Any] = {Kind.TEXT: str, Kind.INT: StrictInt, Kind.NUMBER: float}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationSpec)}


def _body_field(name: str) -> tuple[Any, Any]:
    """A spec field in the JSON body: its type (integers strict: JSON true or 1.0 is not a seed) and default."""
    edges = EDGES[name]
    if edges.kind is Kind.LORAS:  # LoRA name -> weight (names from --lora-dir)
        return dict[str, float], Field(default_factory=dict, description=edges.help)
    # null is the field's default (spec.without_nulls), as a field left out is
    return _JSON_TYPES[edges.kind] | None, Field(_DEFAULTS[name], description=edges.help)


ImageGenerationRequest = create_model(
    "ImageGenerationRequest", __base__=OpenAIImageRequest,
    __doc__="OpenAI's ``POST /v1/images/generations`` body, plus diffbatch's extensions (the spec's fields; the "
            "seed of image i is seed + i).",
    **{name: _body_field(name) for name in BODY_FIELDS})

class CancelRequest(BaseModel):
    """``POST /v1/images/cancel``: the ``request_id`` a generation was sent with."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=REQUEST_ID)


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
_SCHEMAS = {Kind.TEXT: _TEXT, Kind.INT: _INT, Kind.NUMBER: _NUMBER,
            Kind.LORAS: {"type": "object", "additionalProperties": _NUMBER}}
_FORM_SCHEMAS = {**_SCHEMAS, Kind.LORAS: _TEXT}  # a form field holds the JSON object's text
EDIT_BODY = _form({"image": _IMAGE, "prompt": _TEXT, "n": _INT, "size": _TEXT,
                   "response_format": {"type": "string", "enum": ["b64_json", "url"]},
                   **{name: _FORM_SCHEMAS[EDGES[name].kind] for name in FORM_FIELDS}}, ["image", "prompt"])
PARAMETERS_BODY = _form({"image": _IMAGE, "ignore": {**_TEXT, "description": "settings of the PNG diffbatch does "
                                                       "not honour to leave aside (comma-separated keys)"}}, ["image"])
BATCH_BODY = {"requestBody": {"required": True, "content": {"application/jsonl": {"schema": {
    "type": "array", "description": "one JSON object per line, with any GenerationSpec field",
    "items": {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
        name: _SCHEMAS[EDGES[name].kind] for name in BATCH_FIELDS}}}}}}}

# The edits form: OpenAI's fields, then the spec's; each value's text read as its kind.
EDIT_FIELDS = ("prompt", "model", "n", "size", "response_format", "user", "quality", "request_id", *FORM_FIELDS)
FORM_TYPES: dict[str, Callable[[str], Any]] = {"n": int, **{name: PARSE[EDGES[name].kind] for name in FORM_FIELDS}}
