"""ServeSettings: everything `sdturbo serve` can be told, validated once at startup. Safe defaults live here."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _words(value):
    """SDTURBO_ALLOW_ORIGIN="https://a.example https://b.example", as the flag takes them; a JSON list works too."""
    if not isinstance(value, str):
        return value
    if not value.lstrip().startswith("["):
        return value.split()
    try:
        return json.loads(value)
    except ValueError:
        raise ValueError("give the values separated by spaces, or as a JSON list of strings") from None


Words = Annotated[list[str], NoDecode, BeforeValidator(_words)]


def _env(*names: str) -> AliasChoices:
    """A setting whose flag is not its field name is read from SDTURBO_<FLAG>, then from the older SDTURBO_<FIELD>."""
    return AliasChoices(*(f"SDTURBO_{name}" for name in names))


class ServeSettings(BaseSettings):
    """Read from keyword arguments (the command line) first, then the environment: SDTURBO_ and the flag's name
    (SDTURBO_MAX_SIDE for --max-side), or the field's name for settings without a flag (env_names lists them).

    The environment lets an operator pass the API key without it showing in `ps` (SDTURBO_API_KEY)."""

    model_config = SettingsConfigDict(env_prefix="SDTURBO_", extra="forbid", validate_by_name=True)

    model: str = "stabilityai/sdxl-turbo"
    """Hub id, diffusers folder or single file. Only the operator chooses it: no request can name another."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N; one model worker runs on it."""
    dtype: str | None = None
    """fp32, fp16 or bf16; None picks fp16 on CUDA and fp32/bf16 on CPU."""
    vae_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """The VAE's precision; auto follows dtype but runs bf16 for fp16; fp32 decodes as diffusers does."""
    fast: bool = True
    """The fast path (sdturbo.speed.optimize): exact rewrites, same images within rounding, no start-up cost."""
    compile: bool = False
    """Also torch.compile the networks: fastest on a GPU, but every new batch size compiles for minutes first."""
    host: str = "127.0.0.1"
    """Loopback by default: the server is reachable from this machine only unless told otherwise."""
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None
    """When set, every endpoint but /healthz and the static page needs `Authorization: Bearer <key>`."""
    allow_origins: Words = Field([], validation_alias=_env("ALLOW_ORIGIN", "ALLOW_ORIGINS"))
    """Origins allowed by CORS and for browser WebSockets from other sites; empty = same origin only."""
    allowed_hosts: Words = Field([], validation_alias=_env("ALLOW_HOST", "ALLOWED_HOSTS"))
    """Host names answered besides loopback ones, when bound to loopback (e.g. a reverse proxy's); "*" = any."""

    max_batch: int = Field(8, ge=1, le=64)
    """Most images generated in one pipeline call."""
    max_queue: int = Field(64, ge=1, le=10_000)
    """Most requests waiting for the model; one more is answered 429 with Retry-After."""
    request_timeout_s: float = Field(120.0, gt=0, validation_alias=_env("TIMEOUT", "REQUEST_TIMEOUT_S"))
    """A request not answered by then (queue wait included) fails with 503 and leaves the queue."""

    default_side_px: int = Field(512, ge=64, le=2048, multiple_of=8)
    """Width and height when a request names no size; unless set, `sdturbo serve` uses the model's own size (512 for
    SDXL-Turbo, 64 for sdturbo-mini)."""
    max_side_px: int = Field(1024, ge=64, le=2048, multiple_of=8, validation_alias=_env("MAX_SIDE", "MAX_SIDE_PX"))
    max_steps: int = Field(4, ge=1, le=50)
    """SDXL-Turbo is distilled for 1-4 steps; more cost time without helping."""
    max_images_per_request: int = Field(4, ge=1, le=64)
    max_upload_bytes: int = Field(8 * 2**20, ge=1024)
    """Largest uploaded image file; request bodies may be this plus a little form overhead."""
    max_upload_pixels: int = Field(4096 * 4096, ge=64 * 64)
    """Largest decoded image (width x height): refuses decompression bombs before decoding them."""

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().strip()) < 8:
            raise ValueError("must be at least 8 characters, not counting spaces at either end")
        return v

    @model_validator(mode="after")
    def _default_fits(self) -> "ServeSettings":
        # An unset default_side_px becomes the model's own size at startup (serve.command.with_model_default_size),
        # which checks it there; a chosen one must fit now.
        if "default_side_px" in self.model_fields_set and self.max_side_px < self.default_side_px:
            raise ValueError(
                f"--max-side {self.max_side_px} is below SDTURBO_DEFAULT_SIDE_PX {self.default_side_px}: "
                "raise the one or lower the other"
            )
        return self

    @property
    def max_body_bytes(self) -> int:
        """Uploads travel base64-encoded inside JSON (WebSocket) or with form fields (multipart): 4/3 plus slack."""
        return self.max_upload_bytes * 4 // 3 + 64 * 1024


def env_names(field: str) -> tuple[str, ...]:
    """The environment variables a setting is read from, the documented one first."""
    alias = ServeSettings.model_fields[field].validation_alias
    return tuple(alias.choices) if alias else (f"SDTURBO_{field.upper()}",)
