"""`sdturbo bench`: sdturbo against diffusers on the same random weights, in one process, interleaved.

The speed of a network does not depend on its weight values, so both implementations share one set of random
weights (ours are assigned the reference's tensors: no second copy in memory). Warm-up runs are excluded; each
figure is the median of --runs repetitions. Timings are reported, never asserted."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models.configs import PRESETS, ModelSpec

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def write_byte_level_tokenizer(folder: Path, pad_token: str) -> Path:
    """A CLIP-format vocabulary of single bytes only (no merges): tokenization cost and shapes are realistic enough
    for timing, and it needs no download."""
    from tokenizers.pre_tokenizers import ByteLevel

    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(ByteLevel.alphabet())  # CLIP's byte table (the GPT-2 one); ids here are arbitrary
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": pad_token, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _random_init_(module: torch.nn.Module, seed: int) -> None:
    """Small random weights drawn in place on the module's device (fast for billions of parameters: seconds on a
    GPU instead of half a minute through the CPU)."""
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32, device=device).mul_(0.02))
        for name, buf in module.named_buffers():  # to_empty left them uninitialised
            if not name.endswith("position_ids"):
                raise RuntimeError(f"bench does not know how to initialise buffer {name}")
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))


def _materialize(module: torch.nn.Module, device, dtype, seed: int) -> torch.nn.Module:
    module = module.to_empty(device=device).to(dtype)
    _random_init_(module, seed)
    return module.eval().requires_grad_(False)


def build_pair(spec: ModelSpec, device: torch.device, dtype: torch.dtype, workdir: Path,
               vae_dtype: torch.dtype | None = None):
    """-> (our TurboPipeline, diffusers StableDiffusionXLPipeline) sharing the same random weights."""
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise RuntimeError("sdturbo bench compares against diffusers; pip install diffusers transformers") from e
    from .loading.diffusers_folder import with_text_model_prefix
    from .models.clip import CLIPTextModel, text_config_to_transformers
    from .models.unet import UNet, unet_config_to_diffusers
    from .models.vae import AutoencoderKL, vae_compute_dtype, vae_config_to_diffusers
    from .pipeline import TurboPipeline
    from .tokenizer import CLIPTokenizer

    with torch.device("meta"):
        ref_unet = diffusers.UNet2DConditionModel.from_config(unet_config_to_diffusers(spec.unet))
        ref_vae = diffusers.AutoencoderKL.from_config(vae_config_to_diffusers(spec.vae))
        ref_te1 = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**text_config_to_transformers(spec.text_encoder, False)))
        ref_te2 = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**text_config_to_transformers(spec.text_encoder_2, True)))
    vae_dtype = vae_compute_dtype(dtype, device, spec.vae.force_upcast, vae_dtype)
    ref_unet = _materialize(ref_unet, device, dtype, 0)
    ref_vae = _materialize(ref_vae, device, dtype, 1)
    ref_te1 = _materialize(ref_te1, device, dtype, 2)
    ref_te2 = _materialize(ref_te2, device, dtype, 3)

    tok_dirs = (write_byte_level_tokenizer(workdir / "tokenizer", "<|endoftext|>"),
                write_byte_level_tokenizer(workdir / "tokenizer_2", "!"))
    scheduler = diffusers.EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing", steps_offset=1)
    ref = diffusers.StableDiffusionXLPipeline(
        vae=ref_vae, text_encoder=ref_te1, text_encoder_2=ref_te2,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dirs[0]),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(tok_dirs[1]),
        unet=ref_unet, scheduler=scheduler, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)

    def share(ours: torch.nn.Module, theirs: torch.nn.Module) -> torch.nn.Module:
        state = theirs.state_dict()
        if isinstance(ours, CLIPTextModel):  # transformers 5 drops the checkpoint's "text_model." prefix in memory
            state = with_text_model_prefix(state)
        ours.load_state_dict(state, strict=True, assign=True)
        return ours.eval().requires_grad_(False)

    with torch.device("meta"):
        unet, vae = UNet(spec.unet), AutoencoderKL(spec.vae)
        te1, te2 = CLIPTextModel(spec.text_encoder), CLIPTextModel(spec.text_encoder_2)
    # Our VAE gets its own copy where its compute dtype differs (fp16 -> bf16 by default); diffusers upcasts its own to
    # fp32 for each decode.
    vae = share(vae, ref_vae)
    if vae_dtype != dtype:
        vae = vae.to(vae_dtype)
    ours = TurboPipeline(share(unet, ref_unet), share(te1, ref_te1), share(te2, ref_te2), vae,
                         CLIPTokenizer.from_folder(tok_dirs[0]), CLIPTokenizer.from_folder(tok_dirs[1]), spec,
                         name="random-weights")
    return ours, ref


def build_ours(spec: ModelSpec, device: torch.device, dtype: torch.dtype, workdir: Path,
               vae_dtype: torch.dtype | None = None):
    """Our TurboPipeline alone on random weights, for machines without diffusers."""
    from .models.clip import CLIPTextModel
    from .models.unet import UNet
    from .models.vae import AutoencoderKL, vae_compute_dtype
    from .pipeline import TurboPipeline
    from .tokenizer import CLIPTokenizer

    with torch.device("meta"):
        unet, vae = UNet(spec.unet), AutoencoderKL(spec.vae)
        te1, te2 = CLIPTextModel(spec.text_encoder), CLIPTextModel(spec.text_encoder_2)
    vae_dtype = vae_compute_dtype(dtype, device, spec.vae.force_upcast, vae_dtype)
    tokenizers = [CLIPTokenizer.from_folder(write_byte_level_tokenizer(workdir / name, pad))
                  for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))]
    return TurboPipeline(_materialize(unet, device, dtype, 0), _materialize(te1, device, dtype, 2),
                         _materialize(te2, device, dtype, 3), _materialize(vae, device, vae_dtype, 1), *tokenizers,
                         spec, name="random-weights")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1000


@dataclass
class Measurement:
    impl: str
    part: str
    times_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def part_functions(ours, ref, size_px: int, batch: int, steps_list: list[int]):
    """name -> (our callable, diffusers callable) for each part and each end-to-end step count; with ref None,
    name -> (our callable,)."""
    device = ours.device
    prompts = [PROMPT] * batch
    context, pooled = ours.encode_prompt(prompts)
    time_ids = torch.tensor([[size_px, size_px, 0, 0, size_px, size_px]], dtype=ours.dtype, device=device)
    from .models.unet import make_y

    y = make_y(pooled, time_ids.expand(batch, -1), ours.spec.unet)
    h = size_px // ours.spec.vae.downscale_factor
    x = torch.randn(batch, 4, h, h, device=device, dtype=ours.dtype)
    t = torch.tensor(999.0, device=device).expand(batch)  # the form the pipeline passes (compiled graphs guard on it)
    image = ours.decode_latents(x)

    def ref_decode():  # as diffusers' pipeline decodes: an fp16 VAE is upcast to fp32 for the call, then cast back
        upcast = ref.vae.dtype == torch.float16 and ref.vae.config.force_upcast
        if upcast:
            ref.vae.to(torch.float32)
        image = ref.vae.decode(x.to(ref.vae.dtype) / ref.vae.config.scaling_factor).sample
        if upcast:
            ref.vae.to(torch.float16)
        return image

    from .pipeline import _to_output

    def encode_uncached():  # diffusers has no prompt cache; time real encodes (the cache's effect is text -> 0)
        ours.prompt_cache.clear()
        return ours.encode_prompt(prompts)

    parts = {
        "text": (encode_uncached,
                 lambda: ref.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)),
        # A fresh context tensor per call: the fast path would otherwise keep its k and v from the previous call,
        # which the end-to-end rows (new prompt each call, k and v once per call) show where it is real.
        "unet": (lambda: ours.unet(x, t, context.clone(), y),
                 lambda: ref.unet(x, t, encoder_hidden_states=context, added_cond_kwargs={
                     "text_embeds": pooled, "time_ids": time_ids.expand(batch, -1)}).sample),
        "vae_decode": (lambda: ours.decode_latents(x), ref_decode),
        "to_pil": (lambda: _to_output(image, "pil", truncate=False),
                   lambda: ref.image_processor.postprocess(image.clamp(-1, 1), output_type="pil")),
    }
    for steps in steps_list:
        parts[f"end_to_end_{steps}_step"] = (
            lambda s=steps: (ours.prompt_cache.clear(),
                             ours(prompts, num_inference_steps=s, height=size_px, width=size_px, seed=0)),
            lambda s=steps: ref(prompts, num_inference_steps=s, guidance_scale=0.0, height=size_px, width=size_px,
                                generator=torch.Generator("cpu").manual_seed(0)),
        )
    return parts if ref is not None else {name: fns[:1] for name, fns in parts.items()}


def time_parts(parts: dict, impls: list[str], device: torch.device, runs: int, warmup: int) -> dict:
    """-> {(impl, part): Measurement}. Repetitions are interleaved across parts and implementations, so drift hits
    all alike; the first `warmup` are dropped (and compile, where there is any)."""
    results = {(impl, name): Measurement(impl, name) for name in parts for impl in impls}
    for rep in range(warmup + runs):
        for name, fns in parts.items():
            for impl, fn in zip(impls, fns):
                if device.type == "cuda" and rep == warmup:
                    torch.cuda.reset_peak_memory_stats()
                ms = _timed(fn, device)
                if rep >= warmup:
                    results[(impl, name)].times_ms.append(ms)
    return results


def run_bench(config: str = "official", device: str = "auto", dtype: str | None = None, runs: int = 3,
              warmup: int = 1, steps: tuple[int, ...] = (1, 4), batch: int = 1, size_px: int = 512,
              with_diffusers: bool = True, fast: bool = False, compile: bool = False,
              compile_mode: str | None = None, vae_dtype: str | None = None) -> dict:
    """fast: time sdturbo after speed.optimize (compile: with torch.compile, whose first calls are the warm-up).
    vae_dtype: as TurboPipeline.from_pretrained's (None/"auto": dtype, bf16 for fp16)."""
    from .devices import resolve_device, resolve_dtype

    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype, device_)
    vae_dtype_ = None if vae_dtype in (None, "auto") else resolve_dtype(vae_dtype, device_)
    spec = PRESETS["sdxl-turbo" if config == "official" else "tiny"]
    if config != "official":
        size_px = min(size_px, 64)
    # no_grad as in the pipeline, not inference_mode: the fast path keeps a context's k and v only for tensors whose
    # in-place changes it can see
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        t0 = time.perf_counter()
        ours, ref = build_pair(spec, device_, dtype_, Path(tmp), vae_dtype_) if with_diffusers else (
            build_ours(spec, device_, dtype_, Path(tmp), vae_dtype_), None)
        if fast or compile:
            from .speed import optimize

            optimize(ours, compile=compile, compile_mode=compile_mode)
        build_s = time.perf_counter() - t0
        parts = part_functions(ours, ref, size_px, batch, list(steps))
        impls = ["sdturbo"] + (["diffusers"] if with_diffusers else [])
        results = time_parts(parts, impls, device_, runs, warmup)
        peak_mb = {}
        if device_.type == "cuda":
            peak_mb["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    peak_mb["process_max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = []
    for name in parts:
        row = {"part": name, "sdturbo_ms": results[("sdturbo", name)].median_ms}
        if with_diffusers:
            row["diffusers_ms"] = results[("diffusers", name)].median_ms
            row["ratio"] = row["sdturbo_ms"] / row["diffusers_ms"]
        rows.append(row)
    return {
        "config": config, "device": str(device_), "dtype": str(dtype_).replace("torch.", ""),
        "vae_dtype": str(ours.vae_dtype).replace("torch.", ""), "batch": batch,
        "size_px": size_px, "fast": fast or compile, "compile": compile, "compile_mode": compile_mode, "runs": runs,
        "warmup": warmup, "build_s": build_s, "rows": rows, "memory": peak_mb,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if device_.type == "cuda" else None},
        "versions": {"torch": torch.__version__, "diffusers": _diffusers_version()},
        "date": time.strftime("%Y-%m-%d"),
    }


def _diffusers_version() -> str | None:
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def format_table(report: dict) -> str:
    path = "fast" if report["fast"] else "plain"
    if report["compile"]:
        path += f", compiled ({report['compile_mode'] or 'auto'})"
    vae_dtype = report.get("vae_dtype", report["dtype"])
    head = (f"sdturbo bench: {report['config']} sizes, {report['device']} {report['dtype']} (VAE {vae_dtype}), "
            f"batch {report['batch']}, {report['size_px']}x{report['size_px']}, sdturbo {path} path, "
            f"median of {report['runs']} runs")
    lines = [head, f"{'part':<22}{'sdturbo ms':>12}{'diffusers ms':>14}{'ratio':>8}"]
    for r in report["rows"]:
        d = f"{r['diffusers_ms']:>14.1f}{r['ratio']:>8.2f}" if "diffusers_ms" in r else ""
        lines.append(f"{r['part']:<22}{r['sdturbo_ms']:>12.1f}{d}")
    lines.append("memory: " + ", ".join(f"{k} {v:.0f}" for k, v in report["memory"].items()))
    return "\n".join(lines)
