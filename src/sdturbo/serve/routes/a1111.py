"""The AUTOMATIC1111 webui API subset SDXL-Turbo clients use: txt2img, img2img, and the model, sampler and options
queries those clients make before them."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request, Response

from ..deps import ApiKey, EngineDep, SettingsDep
from ..engine import Engine, Job
from ..errors import ApiError
from ..generation import generate_for, server_timing
from ..images import b64_png, decode_base64_image, fit_image
from ..limits import check_count, check_side, check_steps, image_seeds, source_sides
from ..schemas import (
    ERROR_RESPONSES,
    SAMPLER,
    Img2ImgRequest,
    Options,
    OptionsUpdate,
    Sampler,
    SdModel,
    Txt2ImgRequest,
    Txt2ImgResponse,
)
from ..settings import ServeSettings

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], dependencies=[ApiKey], responses=ERROR_RESPONSES)


@router.post("/txt2img", response_model=Txt2ImgResponse)
async def txt2img(
    body: Txt2ImgRequest, request: Request, response: Response, engine: EngineDep, settings: SettingsDep
) -> Txt2ImgResponse:
    job = _job(body, settings, check_side(settings, body.width, "width"), check_side(settings, body.height, "height"))
    return await _respond(body, job, request, response, engine)


@router.post("/img2img", response_model=Txt2ImgResponse)
async def img2img(
    body: Img2ImgRequest, request: Request, response: Response, engine: EngineDep, settings: SettingsDep
) -> Txt2ImgResponse:
    source = await asyncio.to_thread(
        decode_base64_image, body.init_images[0], settings.max_upload_bytes, settings.max_upload_pixels, "init_images"
    )
    width, height = source_sides(settings, source.size, body.width, body.height)
    image = await asyncio.to_thread(fit_image, source, width, height)
    job = _job(body, settings, width, height, image=image, strength=body.denoising_strength)
    return await _respond(body, job, request, response, engine)


@router.get("/sd-models", response_model=list[SdModel])
async def sd_models(engine: EngineDep, settings: SettingsDep) -> list[SdModel]:
    name = _model_title(engine)
    return [SdModel(title=name, model_name=name, filename=settings.model)]


@router.get("/samplers", response_model=list[Sampler])
async def samplers() -> list[Sampler]:
    return [Sampler(name=SAMPLER, aliases=["k_euler_a"], options={})]


@router.get("/options", response_model=Options)
async def get_options(engine: EngineDep) -> Options:
    return Options(sd_model_checkpoint=_model_title(engine))


@router.post("/options", response_model=None)
async def set_options(body: OptionsUpdate, engine: EngineDep) -> None:
    """A1111 clients select the model here before they generate: naming the loaded one (or none) succeeds and
    changes nothing."""
    loaded = _model_title(engine)
    if body.sd_model_checkpoint not in (None, loaded):
        raise ApiError(
            422,
            f"sd_model_checkpoint: this server serves only {loaded!r}; only the operator chooses the model "
            "(sdturbo serve --model)",
            "sd_model_checkpoint",
        )


def _model_title(engine: Engine) -> str:
    """The name the pipeline writes into every image's parameters: a hub id, a file's or folder's name, or sdturbo-mini."""
    return engine.pipeline.name


def _job(body: Txt2ImgRequest, settings: ServeSettings, width: int, height: int, **img2img) -> Job:
    """The fields txt2img and img2img share, checked against this server's limits; img2img adds image and strength."""
    return Job(
        prompt=body.prompt,
        seeds=image_seeds(None if body.seed == -1 else body.seed, _image_count(body, settings)),
        steps=check_steps(settings, body.steps, "steps"),
        width=width,
        height=height,
        guidance_scale=body.cfg_scale,
        negative_prompt=body.negative_prompt or None,  # A1111 sends "" for none
        **img2img,
    )


def _image_count(body: Txt2ImgRequest, settings: ServeSettings) -> int:
    if body.n_iter == 1:
        return check_count(settings, body.batch_size, "batch_size")
    return check_count(settings, body.batch_size * body.n_iter, "batch_size * n_iter")


async def _respond(
    body: Txt2ImgRequest, job: Job, request: Request, response: Response, engine: Engine
) -> Txt2ImgResponse:
    generation = await generate_for(request, engine, job)
    images = await asyncio.to_thread(
        lambda: [b64_png(im, p) for im, p in zip(generation.images, generation.parameters, strict=True)]
    )
    response.headers.update(server_timing(generation))
    applied = body.model_dump() | {
        "seed": job.seeds[0], "width": job.width, "height": job.height, "sampler_name": SAMPLER
    }
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
        "sampler_name": SAMPLER,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "denoising_strength": job.strength if job.image is not None else None,
        "infotexts": [p.to_a1111() for p in generation.parameters],
    }
    return Txt2ImgResponse(images=images, parameters=applied, info=json.dumps(info))
