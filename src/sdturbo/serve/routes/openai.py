"""OpenAI images API: POST /v1/images/generations (text-to-image) and /v1/images/edits (image-to-image), and
GET /v1/models, which OpenAI clients and tools list before they pick a model."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Form, Request, Response

from ..deps import ApiKey, EngineDep, SettingsDep
from ..engine import Generation, Job
from ..generation import generate_for, server_timing
from ..images import b64_png, decode_image, fit_image
from ..limits import check_count, check_side, check_steps, image_seeds
from ..schemas import (
    ERROR_RESPONSES,
    ImageData,
    ImageEditForm,
    ImageGenerationRequest,
    ImagesResponse,
)

router = APIRouter(prefix="/v1/images", tags=["openai"], dependencies=[ApiKey], responses=ERROR_RESPONSES)
models_router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKey], responses=ERROR_RESPONSES)


@models_router.get("/models")
async def list_models(engine: EngineDep) -> dict:
    """The one model the operator loaded (`sdturbo serve --model`), in OpenAI's list shape."""
    return {"object": "list", "data": [{"id": engine.pipeline.name, "object": "model", "created": 0,
                                        "owned_by": "sdturbo"}]}


@router.post("/generations", response_model=ImagesResponse)
async def create_images(
    body: ImageGenerationRequest, request: Request, response: Response, engine: EngineDep, settings: SettingsDep
) -> ImagesResponse:
    width, height = body.width_height
    job = Job(
        prompt=body.prompt,
        seeds=image_seeds(body.seed, check_count(settings, body.n, "n")),
        steps=check_steps(settings, body.steps, "steps"),
        width=check_side(settings, width, "size"),
        height=check_side(settings, height, "size"),
        guidance_scale=body.guidance_scale,
        negative_prompt=body.negative_prompt,
    )
    return await _respond(job, await generate_for(request, engine, job), response)


@router.post("/edits", response_model=ImagesResponse)
async def edit_images(
    form: Annotated[ImageEditForm, Form()],
    request: Request,
    response: Response,
    engine: EngineDep,
    settings: SettingsDep,
) -> ImagesResponse:
    width, height = form.width_height
    width, height = check_side(settings, width, "size"), check_side(settings, height, "size")
    data = await form.image.read(settings.max_upload_bytes + 1)
    source = await asyncio.to_thread(decode_image, data, settings.max_upload_bytes, settings.max_upload_pixels, "image")
    job = Job(
        prompt=form.prompt,
        seeds=image_seeds(form.seed, check_count(settings, form.n, "n")),
        steps=check_steps(settings, form.steps, "steps"),
        width=width,
        height=height,
        guidance_scale=form.guidance_scale,
        negative_prompt=form.negative_prompt,
        image=await asyncio.to_thread(fit_image, source, width, height),
        strength=form.strength,
    )
    return await _respond(job, await generate_for(request, engine, job), response)


async def _respond(job: Job, generation: Generation, response: Response) -> ImagesResponse:
    # PNG encoding takes tens of ms an image: off the event loop.
    pngs = await asyncio.to_thread(
        lambda: [b64_png(im, p) for im, p in zip(generation.images, generation.parameters, strict=True)]
    )
    response.headers.update(server_timing(generation))
    data = [
        ImageData(b64_json=png, seed=seed, revised_prompt=job.prompt) for png, seed in zip(pngs, job.seeds, strict=True)
    ]
    return ImagesResponse(created=int(time.time()), data=data)
