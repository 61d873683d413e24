"""Request and response models: OpenAI images, the A1111 subset, WebSocket messages.

The bounds here are the outer envelope the OpenAPI document promises; the server's own, possibly tighter, limits
(ServeSettings) are checked in limits.py, which alone checks image sides, so that its message states this server's
limits. JSON bodies are strict (no "5" for 5, no true for 1) and refuse unknown fields, so a typo is an error that
names the field instead of a silently ignored setting."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import UploadFile
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

MIN_SIDE_PX, MAX_SIDE_PX, SIDE_MULTIPLE = 64, 2048, 8
MAX_STEPS = 50
MAX_IMAGES = 16
SAMPLER = "Euler a"  # A1111's name for the Euler ancestral sampler, the only one SDXL-Turbo uses
SAMPLER_ALIASES = ("euler a", "k_euler_a", "euler_a")
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 4000
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")

Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
NegativePrompt = Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)]
Side = Annotated[
    int | None,
    Field(json_schema_extra={"minimum": MIN_SIDE_PX, "maximum": MAX_SIDE_PX, "multipleOf": SIDE_MULTIPLE}),
]
Seed = Annotated[int | None, Field(ge=0, le=MAX_SEED)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Count = Annotated[int, Field(ge=1, le=MAX_IMAGES)]
Guidance = Annotated[float, Field(ge=0.0, le=30.0, allow_inf_nan=False)]
Strength = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
ShortText = Annotated[str | None, Field(max_length=256)]


def parse_size(size: str) -> tuple[int, int]:
    """ "WxH" -> (width, height); limits.check_side checks the sides."""
    m = _SIZE.match(size)
    if not m:
        raise ValueError(f"must look like 512x512 (WIDTHxHEIGHT), got {size[:32]!r}")
    return int(m[1]), int(m[2])


class _SizedRequest(BaseModel):
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 512x512; default: the server's default size")

    @field_validator("size")
    @classmethod
    def _check_size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v

    @property
    def width_height(self) -> tuple[int | None, int | None]:
        return parse_size(self.size) if self.size else (None, None)


# -- OpenAI images API -----------------------------------------------------------------------------------------


class ImageGenerationRequest(_SizedRequest):
    """POST /v1/images/generations. `model` and `user` are accepted for OpenAI clients and ignored: the model is
    chosen when the server starts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    n: Count = 1
    response_format: Literal["b64_json"] = "b64_json"
    seed: Seed = Field(None, description="image i gets seed + i; default random")
    steps: Steps = 1
    guidance_scale: Guidance = 0.0
    negative_prompt: NegativePrompt = None
    model: ShortText = None
    user: ShortText = None


class ImageEditForm(_SizedRequest):
    """POST /v1/images/edits (multipart). Form values are text, so numbers are parsed from strings here."""

    model_config = ConfigDict(extra="forbid")

    image: UploadFile = Field(description="PNG, JPEG or WEBP")
    prompt: Prompt
    n: Count = 1
    strength: Strength = 0.5
    steps: Steps = 2
    seed: Seed = Field(None, description="image i gets seed + i; default random")
    guidance_scale: Guidance = 0.0
    negative_prompt: NegativePrompt = None
    response_format: Literal["b64_json"] = "b64_json"
    model: ShortText = None
    user: ShortText = None

    @field_validator("image", mode="before")
    @classmethod
    def _a_file(cls, v):
        if isinstance(v, str):  # curl -F image=photo.png, where -F image=@photo.png was meant
            raise ValueError("must be an uploaded file (multipart, e.g. curl -F image=@photo.png), got a text field")
        return v


class ImageData(BaseModel):
    b64_json: str = Field(description="PNG, base64; its 'parameters' text chunk holds the generation settings")
    seed: int
    revised_prompt: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


# -- A1111 (stable-diffusion-webui) API subset ----------------------------------------------------------------


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img: the fields SDXL-Turbo uses. seed -1 means random; image i gets seed + i."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    steps: Steps = 1
    cfg_scale: Guidance = 0.0
    width: Side = None
    height: Side = None
    batch_size: Count = 1
    n_iter: Count = Field(1, description="batches: batch_size * n_iter images, all in one pipeline call here")
    sampler_name: str | None = Field(None, description=f"only {SAMPLER!r}, SDXL-Turbo's sampler, which is the default")

    @field_validator("sampler_name")
    @classmethod
    def _our_sampler(cls, v: str | None) -> str | None:
        # A1111 clients name the sampler in every request; accepting ours keeps them working, refusing others
        # keeps a request for another sampler from being answered with a different one's image.
        if v is not None and v.strip().lower() not in SAMPLER_ALIASES:
            raise ValueError(f"sdturbo has only {SAMPLER!r} (SDXL-Turbo's sampler), got {v[:64]!r}")
        return v


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields plus the source image. A side left out follows the source image."""

    # exclude: not echoed back in the response's `parameters`, where it would be megabytes of base64.
    init_images: list[str] = Field(
        exclude=True,
        description="exactly one PNG, JPEG or WEBP, base64 (a data: URL is fine)",
        json_schema_extra={"minItems": 1, "maxItems": 1},
    )
    denoising_strength: Strength = 0.75

    @field_validator("init_images")
    @classmethod
    def _one_image(cls, v: list[str]) -> list[str]:
        if len(v) != 1:
            raise ValueError(f"must hold exactly one image, got {len(v)}")
        return v


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="PNGs, base64")
    parameters: dict = Field(description="the request as the server applied it")
    info: str = Field(description="JSON text: seeds, prompts and A1111 infotexts per image")


class SdModel(BaseModel):
    """GET /sdapi/v1/sd-models: the one model `sdturbo serve --model` loaded."""

    title: str
    model_name: str
    hash: None = None
    sha256: None = None
    filename: str
    config: None = None


class Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict


class Options(BaseModel):
    """GET and POST /sdapi/v1/options. POST accepts only the loaded model: the operator chooses it, not a request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sd_model_checkpoint: str = Field(max_length=1024)


class OptionsUpdate(Options):
    """POST /sdapi/v1/options: A1111 takes any subset of its options, {} included."""

    sd_model_checkpoint: str | None = Field(None, max_length=1024)


# -- WebSocket /ws --------------------------------------------------------------------------------------------

def _message_id(value):
    # Checked before the union is tried, so that a wrong id is one error, not one for each member of the union.
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise ValueError("must be an integer or a string")
    if isinstance(value, str) and len(value) > 128:
        raise ValueError("must be at most 128 characters")
    return value


MessageId = Annotated[int | str | None, BeforeValidator(_message_id)]


class WsGenerate(BaseModel):
    """{"type": "generate", ...}: one image. "image" is base64 (a data: URL is fine) for image-to-image."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["generate"] = "generate"
    id: MessageId = Field(None, description="echoed back with the result")
    prompt: Prompt
    negative_prompt: NegativePrompt = None
    seed: Seed = None
    steps: Steps = 1
    width: Side = None
    height: Side = None
    guidance_scale: Guidance = 0.0
    image: str | None = None
    strength: Strength = 0.5
    format: Literal["jpeg", "png"] = "jpeg"
    preview: bool = Field(False, description="also send a JPEG preview at latent resolution after every step")


class WsDownload(BaseModel):
    """{"type": "download", "id": ...}: the PNG (with parameters) of a recent result on this connection."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["download"]
    id: MessageId


class WsAuth(BaseModel):
    """{"type": "auth", "api_key": ...}: for browsers, which cannot set headers on a WebSocket."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["auth"]
    api_key: str = Field(max_length=1024)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "malformed JSON or multipart body"),
        (401, "missing or wrong API key"),
        (413, "upload or body too large"),
        (415, "upload is not a PNG, JPEG or WEBP image"),
        (422, "a field is out of range or of the wrong type; `param` names it"),
        (429, "queue full; see Retry-After"),
        (503, "timed out"),
    ]
}
