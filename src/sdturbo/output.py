"""PNG output carrying the generation parameters in the text chunk A1111-style tools read ("parameters")."""

from __future__ import annotations

import io
import os
import tempfile
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


def check_writable(path: str | Path) -> Path:
    """Fail before generating, not after: the folder must exist and be writable."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OSError(f"output path {path} is a folder; give a file name such as {path / 'image.png'}")
    if not folder.is_dir():
        raise OSError(f"output folder {folder} does not exist; create it or choose another -o path")
    if not os.access(folder, os.W_OK):
        raise OSError(f"output folder {folder} is not writable; choose another -o path")
    return path


def save_png(image: Image.Image, path: str | Path, parameters: GenerationParameters | str) -> Path:
    """Write atomically (temp file + rename), so a failure never leaves a half-written image behind."""
    path = check_writable(path)
    data = png_bytes(image, parameters)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_parameters(path: str | Path) -> str | None:
    with Image.open(path) as im:
        return im.text.get("parameters") if hasattr(im, "text") else None
