"""PNG output carrying the generation parameters in the text chunk A1111-style tools read ("parameters")."""

from __future__ import annotations

import io
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


@dataclass(frozen=True)
class GenerationParameters:
    prompt: str
    negative_prompt: str | None
    steps: int
    guidance_scale: float
    seed: int | None
    width: int
    height: int
    model: str
    schedule: str = "trailing"
    strength: float | None = None  # img2img only
    # Where the images of a call share one random stream (seed=int or one generator): image batch_pos of batch_size,
    # which only the whole batch reproduces.
    batch_size: int | None = None
    batch_pos: int | None = None

    def to_a1111(self) -> str:
        """A1111 infotext: prompt line, optional negative line, then comma-separated key: value pairs."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = {
            "Steps": self.steps,
            "Sampler": "Euler a",
            "Schedule type": self.schedule,
            "CFG scale": self.guidance_scale,
            "Seed": self.seed if self.seed is not None else "unknown",
            "Size": f"{self.width}x{self.height}",
            "Model": self.model,
        }
        if self.batch_size is not None:
            fields["Batch size"], fields["Batch pos"] = self.batch_size, self.batch_pos
        if self.strength is not None:
            fields["Denoising strength"] = self.strength
        lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
        return "\n".join(lines)


def png_bytes(image: Image.Image, parameters: GenerationParameters | str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters if isinstance(parameters, str) else parameters.to_a1111())
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def check_writable(path: str | Path, flag: str = "-o", example: str = "image.png") -> Path:
    """Fail before generating, not after: the folder must exist and take a new file. flag: the option that gave the
    path, and example a file name for it, for the messages."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OSError(f"output path {path} is a folder; give {flag} a file name such as {path / example}")
    if folder.exists() and not folder.is_dir():
        raise OSError(f"output folder {folder} is a file, not a folder; choose another {flag} path")
    if not folder.is_dir():
        raise OSError(f"output folder {folder} does not exist; create it or choose another {flag} path")
    try:  # a real file, as os.access says yes to root even where nothing can be created (/proc)
        fd, tmp = _create_temp(path)
    except OSError as e:
        raise OSError(f"output folder {folder} is not writable ({e.strerror}); choose another {flag} path") from None
    os.close(fd)
    tmp.unlink()
    return path


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new file beside `path`, open for writing, with the mode the user's umask gives new files (mkstemp's are
    0600, which the renamed PNG would keep)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def save_png(image: Image.Image, path: str | Path, parameters: GenerationParameters | str) -> Path:
    """Write atomically (temp file + rename), so a failure never leaves a half-written image behind."""
    path = check_writable(path)
    data = png_bytes(image, parameters)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_parameters(path: str | Path) -> str | None:
    with Image.open(path) as im:
        return im.text.get("parameters") if hasattr(im, "text") else None
