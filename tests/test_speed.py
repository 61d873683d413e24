"""The fast path computes the same function as the plain path: each transformation on its own, then the whole
optimize() on a tiny pipeline (fp32, CPU). The prompt cache. Timings are never asserted here (see BENCHMARKS.md)."""

from __future__ import annotations

import copy

import pytest
import numpy as np
import torch
import torch.nn.functional as F

from sdturbo import speed
from sdturbo.bench import write_byte_level_tokenizer
from sdturbo.models.clip import CLIPTextModel
from sdturbo.models.configs import TINY
from sdturbo.models.layers import Attention, Upsample2D
from sdturbo.models.unet import UNet
from sdturbo.models.vae import AutoencoderKL
from sdturbo.pipeline import TurboPipeline
from sdturbo.tokenizer import CLIPTokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*differs from.*the size this model was trained at")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_upsample_matches_upsample_then_conv(channels_last):
    torch.manual_seed(0)
    up = Upsample2D(24).eval()
    x = torch.randn(2, 24, 5, 7)
    fast = speed.SubpixelUpsample2D(up)
    if channels_last:
        fast, x = fast.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = up(x), fast(x)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(fast(x, (10, 14)), ref, atol=1e-5, rtol=1e-5)  # an explicit exact-x2 size
        assert torch.allclose(fast(x, (9, 13)), up(x, (9, 13)))  # other sizes take the plain path
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert fast.state_dict().keys() == up.state_dict().keys()


@pytest.mark.parametrize("context_dim", [None, 48, 32])  # self-attention, cross-attention, cross with equal widths
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_attention_matches_attention(context_dim, qkv_bias):
    torch.manual_seed(0)
    attn = Attention(32, context_dim, heads=2, head_dim=16, qkv_bias=qkv_bias).eval()
    ref_attn = copy.deepcopy(attn)
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, context_dim) if context_dim else None
    fused = speed.FusedAttention(attn)
    with torch.no_grad():
        assert torch.allclose(fused(x, context), ref_attn(x, context), atol=1e-5, rtol=1e-5)
    # Same keys and values; loading new weights reaches the fused copy through the views.
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in ref_attn.state_dict().items()}
    other = Attention(32, context_dim, heads=2, head_dim=16, qkv_bias=qkv_bias).eval()
    fused.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(fused(x, context), other(x, context), atol=1e-5, rtol=1e-5)


def count_kv_projections(monkeypatch, modules) -> list:
    """Patches F.linear to record every call that projects a context through one of these cross-attentions' fused
    k/v weight (that slice is the whole fused weight, so its data pointer names it)."""
    kv_weights = {m.weight.data_ptr() for m in modules if not m.is_qkv}
    calls, linear = [], F.linear

    def counting_linear(x, weight, bias=None):
        if weight.data_ptr() in kv_weights:
            calls.append(weight.data_ptr())
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", counting_linear)
    return calls


def test_cross_attention_computes_k_and_v_once_per_context(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(32, 48, heads=2, head_dim=16).eval()
    fused = speed.FusedAttention(copy.deepcopy(attn))
    calls = count_kv_projections(monkeypatch, [fused])
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 48)
    with torch.no_grad():
        first = fused(x, context)
        assert torch.equal(fused(x, context), first) and len(calls) == 1  # same tensor: k, v reused, same result
        assert torch.equal(fused(x, context.clone()), first) and len(calls) == 2  # another tensor: computed anew
        context.mul_(2)  # changed in place: its k and v are stale
        assert torch.allclose(fused(x, context), attn(x, context), atol=1e-5, rtol=1e-5) and len(calls) == 3
        other = Attention(32, 48, heads=2, head_dim=16).eval()
        fused.load_state_dict(other.state_dict())  # new weights: stale too
        assert torch.allclose(fused(x, context), other(x, context), atol=1e-5, rtol=1e-5) and len(calls) == 4
    fused(x, context), fused(x, context)  # with autograd on nothing is kept (k and v would hold the graph)
    assert len(calls) == 6
    with torch.inference_mode():  # inference tensors track no in-place changes: nothing is kept
        context = torch.randn(2, 7, 48)
        fused(x, context), fused(x, context)
    assert len(calls) == 8


def tiny_pipeline(tmp_path, dtype=torch.float32) -> TurboPipeline:
    """TINY with PyTorch's default initialisation, whose activations stay O(1) (small random weights would make
    every difference look small)."""
    torch.manual_seed(0)
    spec = TINY
    tokenizers = [CLIPTokenizer.from_folder(write_byte_level_tokenizer(tmp_path / name, pad))
                  for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))]
    models = [m.to(dtype).eval().requires_grad_(False) for m in (
        UNet(spec.unet), CLIPTextModel(spec.text_encoder), CLIPTextModel(spec.text_encoder_2), AutoencoderKL(spec.vae))]
    return TurboPipeline(*models, *tokenizers, spec, name="tiny-random")


def test_optimize_keeps_every_state_dict(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    models = ("unet", "vae", "text_encoder", "text_encoder_2")
    before = {m: {k: v.clone() for k, v in getattr(pipe, m).state_dict().items()} for m in models}
    speed.optimize(pipe, channels_last=True, fuse_qkv=True, cpu_malloc=False)
    assert isinstance(pipe.unet.up_blocks[0].upsamplers[0], speed.SubpixelUpsample2D)
    assert isinstance(pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1, speed.FusedAttention)
    for m in models:
        after = getattr(pipe, m).state_dict()
        assert after.keys() == before[m].keys()
        assert all(torch.equal(after[k], v) for k, v in before[m].items())


def test_optimized_pipeline_matches_plain(tmp_path):
    plain = tiny_pipeline(tmp_path)
    fast = speed.optimize(tiny_pipeline(tmp_path), channels_last=True, fuse_qkv=True, cpu_malloc=False)
    kwargs = {"prompt": "a red circle", "height": 64, "width": 64, "seed": 3, "output_type": "pt",
              "num_inference_steps": 2}
    assert rel_err(fast(**kwargs).images, plain(**kwargs).images) < 1e-5
    img2img = {**kwargs, "image": torch.rand(1, 3, 64, 64), "strength": 0.5}
    assert rel_err(fast(**img2img).images, plain(**img2img).images) < 1e-5


def test_fast_pipeline_projects_each_context_once(tmp_path, monkeypatch):
    """Multi-step calls project the text context once, and a cached prompt's context is not projected again."""
    fast = speed.optimize(tiny_pipeline(tmp_path), fuse_qkv=True, cpu_malloc=False)
    cross = [m for m in fast.unet.modules() if isinstance(m, speed.FusedAttention) and not m.is_qkv]
    calls = count_kv_projections(monkeypatch, cross)
    kwargs = {"prompt": "a red circle", "height": 64, "width": 64, "seed": 3, "output_type": "pt"}
    first = fast(**kwargs, num_inference_steps=3).images
    assert len(calls) == len(cross) > 0
    again = fast(**kwargs, num_inference_steps=3).images
    assert len(calls) == len(cross) and torch.equal(again, first)
    fast(**{**kwargs, "prompt": "a blue square"})
    assert len(calls) == 2 * len(cross)
    fast(**kwargs, num_images_per_prompt=2, num_inference_steps=2)  # a repeated context: once per call
    assert len(calls) == 3 * len(cross)


def test_bf16_fast_path_is_as_close_to_fp32_as_the_plain_bf16_path(tmp_path):
    """The fast path's bf16 rounding (summed upsample taps, NHWC kernels) adds no error beyond bf16's own."""
    kwargs = {"prompt": "a cat", "height": 64, "width": 64, "seed": 1, "output_type": "pt"}
    ref = tiny_pipeline(tmp_path)(**kwargs).images
    plain = tiny_pipeline(tmp_path, torch.bfloat16)(**kwargs).images
    out = speed.optimize(tiny_pipeline(tmp_path, torch.bfloat16), cpu_malloc=False)(**kwargs).images
    assert rel_err(out, ref) < 2 * rel_err(plain, ref) + 1e-3


def test_prompt_cache_skips_the_text_encoders(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    calls = []
    pipe.text_encoder_2.register_forward_hook(lambda *args: calls.append(1))
    pipe.prompt_cache_size = 2
    first = pipe.encode_prompt(["a dog"])
    again = pipe.encode_prompt(["a dog"])
    assert len(calls) == 1 and torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert again[0] is not first[0]  # copies: the caller may change them, the cache keeps its own
    pipe.encode_prompt(["a cat"])
    pipe.encode_prompt(["a bird"])  # evicts "a dog", the least recently used
    assert list(pipe.prompt_cache) == [("a cat",), ("a bird",)]
    recomputed = pipe.encode_prompt(["a dog"])
    assert len(calls) == 4 and torch.equal(recomputed[0], first[0]) and torch.equal(recomputed[1], first[1])
    pipe.prompt_cache.clear()
    pipe.prompt_cache_size = 0
    pipe.encode_prompt(["a dog"])
    assert not pipe.prompt_cache


def test_cached_prompt_gives_the_same_images(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    kwargs = {"prompt": "a red circle", "height": 64, "width": 64, "seed": 5, "output_type": "pt"}
    first = pipe(**kwargs).images
    assert ("a red circle",) in pipe.prompt_cache
    assert torch.equal(pipe(**kwargs).images, first)


def test_encode_cache_skips_the_vae_encoder_for_an_unchanged_image(tmp_path):
    from PIL import Image

    pipe = tiny_pipeline(tmp_path)
    calls = []
    pipe.vae.encoder.register_forward_hook(lambda *args: calls.append(1))
    rng = np.random.default_rng(0)
    image, other = (Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2))
    kwargs = {"image": image, "strength": 0.5, "num_inference_steps": 2, "seed": 3, "output_type": "pt"}
    first = pipe("a red circle", **kwargs).images
    again = pipe("a blue circle", **kwargs).images  # a new prompt over the same image: no encode
    assert len(calls) == 1 and len(pipe.encode_cache) == 1
    assert torch.equal(pipe("a red circle", **kwargs).images, first) and not torch.equal(again, first)
    pipe("a red circle", **{**kwargs, "image": other})
    assert len(calls) == 2 and len(pipe.encode_cache) == 2
    pipe.encode_cache.clear()
    pipe.encode_cache_size = 0
    assert torch.equal(pipe("a red circle", **kwargs).images, first)
    assert len(calls) == 3 and not pipe.encode_cache


def test_keep_freed_memory_runs():
    assert speed.keep_freed_memory() in (True, False)


def test_compile_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert speed.use_compile_cache() == tmp_path / "inductor"
    assert (tmp_path / "inductor").is_dir()


def test_fast_path_unet_traces_as_one_graph(tmp_path):
    """compile_models uses fullgraph=True: the fast path's modules (the k/v memo included) must trace without a break.
    The eager backend checks the capture in seconds, without inductor's code generation."""
    pipe = speed.optimize(tiny_pipeline(tmp_path), fuse_qkv=True, cpu_malloc=False)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, TINY.unet.context_dim)
    y = torch.randn(1, TINY.unet.adm_in_channels)
    t = torch.tensor(999.0).expand(1)
    torch._dynamo.reset()
    compiled = torch.compile(pipe.unet, fullgraph=True, dynamic=False, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x, t, context, y), pipe.unet(x, t, context, y))


def test_cpu_compile_freezes_the_unet_alone(tmp_path, monkeypatch):
    """On a CPU only the UNet gains from inductor (with freezing); the VAE decoder measured slower compiled."""
    pipe = tiny_pipeline(tmp_path)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(self))
    for name, value in (("freezing", False), ("conv_1x1_as_mm", torch._inductor.config.conv_1x1_as_mm)):
        monkeypatch.setattr(torch._inductor.config, name, value)  # restored after the test
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", torch._dynamo.config.cache_size_limit)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    speed.compile_models(pipe)
    assert compiled == [pipe.unet] and torch._inductor.config.freezing
