"""Fast preview decode for live views: a linear map from the 4 latent channels to RGB, no VAE and no weights.

The SDXL latent space is close to linear in colour at each latent pixel, so a 4x3 matrix fitted once against real
VAE decodes (the factors ComfyUI uses for SDXL previews) gives a blurry but faithful thumbnail at latent resolution
(64x64 for a 512x512 image) in microseconds, against seconds for the VAE on a CPU. It is a preview, not the
image: use TurboPipeline.decode_latents for output. Another VAE (sdturbo-mini's) has its own latent space:
fit_latent_rgb finds its matrix through its encoder in a fraction of a second."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows: latent channels 0-3; columns: R, G, B. They act on scaled latents (the sampler's x), giving RGB in [-1, 1].
SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


LatentRGB = tuple[torch.Tensor, torch.Tensor]  # (factors [C, 3], bias [3]), float32
SDXL_LATENT_RGB: LatentRGB = (torch.tensor(SDXL_LATENT_RGB_FACTORS), torch.tensor(SDXL_LATENT_RGB_BIAS))


def latents_to_rgb(x: torch.Tensor, factors: LatentRGB = SDXL_LATENT_RGB) -> torch.Tensor:
    """Scaled latents [B, C, h, w] -> image [B, 3, h, w] in [-1, 1] (float32, clamped), on x's device."""
    weight, bias = (t.to(x.device, torch.float32) for t in factors)
    image = F.linear(x.float().movedim(1, -1), weight.T, bias).movedim(-1, 1)
    return image.clamp(-1, 1)


@torch.no_grad()
def fit_latent_rgb(vae, scaling_factor: float, downscale: int, images: int = 64, seed: int = 0) -> LatentRGB:
    """Least-squares factors for another VAE: encode images of random flat colour blocks (two latent pixels wide, so
    most latent pixels see one colour) and regress each block's colour on its scaled latents. On sdturbo-mini this
    previews generated images at 0.26 mean absolute error (in [-1, 1]) against their average-pooled VAE decodes,
    where the SDXL factors give 1.1 and a constant colour 0.57 (measured on 16 prompts, 4 steps)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(images, 3, 4, 4, generator=g) * 2 - 1
    pixels = F.interpolate(blocks, scale_factor=2 * downscale, mode="nearest")  # [N, 3, 8 * downscale, same]
    param = next(vae.parameters())
    mean, _ = vae.encode(pixels.to(param.device, param.dtype))
    latents = (mean.float().cpu() * scaling_factor).movedim(1, -1).flatten(0, 2)  # [N*h*w, C]
    colours = F.avg_pool2d(pixels, downscale).movedim(1, -1).flatten(0, 2)  # [N*h*w, 3]
    design = torch.cat([latents, torch.ones(len(latents), 1)], dim=1)
    solution = torch.linalg.lstsq(design, colours).solution
    return solution[:-1].contiguous(), solution[-1].contiguous()


def preview_pixels(x: torch.Tensor, scale: int = 1, factors: LatentRGB = SDXL_LATENT_RGB) -> torch.Tensor:
    """Scaled latents [B, 4, h, w] -> uint8 pixels [B, h*scale, w*scale, 3] on the CPU, ready for PIL or a socket.

    scale > 1 enlarges with nearest neighbours (8 gives the final image's size); the conversion to uint8 happens on
    x's device, so only bytes cross to the host."""
    image = latents_to_rgb(x, factors)
    if scale > 1:
        image = F.interpolate(image, scale_factor=scale, mode="nearest")
    pixels = ((image + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu()
