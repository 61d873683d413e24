"""The server's own limits (ServeSettings), applied to already-parsed requests; each refusal names its field."""

from __future__ import annotations

import secrets

from .errors import ApiError
from .schemas import MAX_SEED, MIN_SIDE_PX, SIDE_MULTIPLE
from .settings import ServeSettings


def check_side(settings: ServeSettings, side_px: int | None, field: str) -> int:
    """-> the side in pixels, the server's default when the request names none."""
    side_px = settings.default_side_px if side_px is None else side_px
    if not MIN_SIDE_PX <= side_px <= settings.max_side_px or side_px % SIDE_MULTIPLE:
        raise ApiError(
            422,
            f"{field}: sides must be multiples of {SIDE_MULTIPLE} from {MIN_SIDE_PX} to {settings.max_side_px} px on "
            f"this server, got {side_px}",
            field,
        )
    return side_px


def source_sides(
    settings: ServeSettings, source_size: tuple[int, int], width: int | None, height: int | None
) -> tuple[int, int]:
    """img2img's sides. A side the request leaves out follows the source image: the source's aspect applied to the
    side it names, or with neither named the source's size scaled down to fit this server's limit; rounded to a
    multiple of 8 within the limits, so that fit_image crops only what the rounding leaves over."""
    width = None if width is None else check_side(settings, width, "width")
    height = None if height is None else check_side(settings, height, "height")
    source_w, source_h = source_size
    if width is not None:
        scale = width / source_w
    elif height is not None:
        scale = height / source_h
    else:
        scale = min(1.0, settings.max_side_px / max(source_size))

    def fitted(px: float) -> int:
        return min(max(round(px / SIDE_MULTIPLE) * SIDE_MULTIPLE, MIN_SIDE_PX), settings.max_side_px)

    return width or fitted(source_w * scale), height or fitted(source_h * scale)


def check_steps(settings: ServeSettings, steps: int, field: str) -> int:
    if steps > settings.max_steps:
        raise ApiError(422, f"{field}: {steps} exceeds this server's limit of {settings.max_steps} steps", field)
    return steps


def check_count(settings: ServeSettings, n: int, field: str) -> int:
    """A request's images run in one pipeline call, so --max-batch bounds them too."""
    limit = min(settings.max_images_per_request, settings.max_batch)
    if n > limit:
        raise ApiError(422, f"{field}: {n} exceeds this server's limit of {limit} images a request", field)
    return n


def image_seeds(seed: int | None, n: int) -> tuple[int, ...]:
    """Image i gets seed + i (A1111's and diffusers' convention), wrapping past MAX_SEED to 0 so that every seed
    returned can be asked for again; no seed means a random one."""
    base = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    return tuple((base + i) % (MAX_SEED + 1) for i in range(n))
