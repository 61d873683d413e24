"""Images in and out: uploads are decoded only if they are PNG, JPEG or WEBP and within the byte and pixel limits
(read from the header before any pixel is decoded, which is what defeats decompression bombs)."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps

from ..output import png_bytes
from .errors import ApiError

FORMATS = ("PNG", "JPEG", "WEBP")
JPEG_QUALITY = 90
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,")


def decode_image(data: bytes, max_bytes: int, max_pixels: int, field: str) -> Image.Image:
    """Upload bytes -> RGB image; 413 when too big, 415 when not an image we decode, 422 when corrupt."""
    if len(data) > max_bytes:
        raise ApiError(413, f"{field}: {len(data)} bytes exceeds the limit of {max_bytes} bytes", field)
    # Decoders meet hostile bytes here and fail in many ways (struct.error, IndexError, ...): any failure is the
    # upload's fault, never the server's.
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ApiError(413, f"{field}: image has too many pixels", field) from None
    except Exception:
        raise ApiError(415, f"{field}: not a PNG, JPEG or WEBP image", field) from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ApiError(
            413, f"{field}: {image.width}x{image.height} is {pixels} pixels, over the limit of {max_pixels}", field
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        image = ImageOps.exif_transpose(image)  # phone photos: apply the orientation tag
    except Exception as e:
        raise ApiError(422, f"{field}: the image data is truncated or corrupt ({type(e).__name__})", field) from None
    return _to_rgb(image)


def decode_base64_image(text: str, max_bytes: int, max_pixels: int, field: str) -> Image.Image:
    """A base64 string or data: URL -> RGB image, with decode_image's checks."""
    text = _DATA_URL.sub("", text, count=1)
    if len(text) * 3 // 4 > max_bytes + 3:
        raise ApiError(413, f"{field}: about {len(text) * 3 // 4} bytes exceeds the limit of {max_bytes} bytes", field)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: not valid base64", field) from None
    return decode_image(data, max_bytes, max_pixels, field)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Transparent areas become white, as they look on a page, not the black their RGB values often hold."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and centre-crop to exactly width x height, keeping the aspect (the pipeline would stretch it)."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), Image.LANCZOS)


def encode_image(image: Image.Image, fmt: str, parameters) -> bytes:
    """fmt "png": lossless, with the A1111 'parameters' text chunk; "jpeg": small and fast, for live previews."""
    if fmt == "png":
        return png_bytes(image, parameters)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def b64_png(image: Image.Image, parameters) -> str:
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")
