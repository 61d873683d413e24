"""The AUTOMATIC1111 webui API subset SDXL-Turbo clients use: POST /sdapi/v1/txt2img."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request, Response

from ..deps import ApiKey, EngineDep, KeyFirstRoute, SettingsDep
from ..engine import Job
from ..generation import generate_for, server_timing
from ..images import b64_png
from ..limits import check_count, check_side, check_steps, image_seeds
from ..schemas import ERROR_RESPONSES, Txt2ImgRequest, Txt2ImgResponse

router = APIRouter(
    prefix="/sdapi/v1", tags=["a1111"], dependencies=[ApiKey], responses=ERROR_RESPONSES, route_class=KeyFirstRoute
)


@router.post("/txt2img", response_model=Txt2ImgResponse)
async def txt2img(
    body: Txt2ImgRequest, request: Request, response: Response, engine: EngineDep, settings: SettingsDep
) -> Txt2ImgResponse:
    job = Job(
        prompt=body.prompt,
        seeds=image_seeds(None if body.seed == -1 else body.seed, check_count(settings, body.batch_size, "batch_size")),
        steps=check_steps(settings, body.steps, "steps"),
        width=check_side(settings, body.width, "width"),
        height=check_side(settings, body.height, "height"),
        guidance_scale=body.cfg_scale,
        negative_prompt=body.negative_prompt or None,  # A1111 sends "" for none
    )
    generation = await generate_for(request, engine, job)
    images = await asyncio.to_thread(
        lambda: [b64_png(im, p) for im, p in zip(generation.images, generation.parameters, strict=True)]
    )
    response.headers.update(server_timing(generation))
    applied = body.model_dump() | {"seed": job.seeds[0], "width": job.width, "height": job.height}
    info = {
        "prompt": job.prompt,
        "all_prompts": [job.prompt] * len(job.seeds),
        "negative_prompt": body.negative_prompt,
        "seed": job.seeds[0],
        "all_seeds": list(job.seeds),
        "steps": job.steps,
        "cfg_scale": job.guidance_scale,
        "width": job.width,
        "height": job.height,
        "sampler_name": "Euler a",
        "batch_size": len(job.seeds),
        "infotexts": [p.to_a1111() for p in generation.parameters],
    }
    return Txt2ImgResponse(images=images, parameters=applied, info=json.dumps(info))
