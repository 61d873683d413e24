"""Opt-in fast path for a loaded TurboPipeline: the same function, computed faster.

Applied from outside after loading, like gpt-fast's quantize/tp: module swaps and layout changes on the plain
models, then optionally torch.compile. State-dict keys do not change. tests/test_speed.py checks each step against
the plain path. Measured effects and the trade-offs are in BENCHMARKS.md."""

from __future__ import annotations

import ctypes
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .models.layers import Attention, Upsample2D

# How the 3 taps of a 3x3 kernel along one axis fall on 2 source pixels after nearest x2, for output phase 0 (even
# rows/columns: source offsets -1, 0) and phase 1 (odd: offsets 0, +1). [phase, source tap, kernel tap]
_PHASE_TAPS = torch.tensor([[[1.0, 0, 0], [0, 1, 1]], [[1.0, 1, 0], [0, 0, 1]]])


class SubpixelUpsample2D(nn.Module):
    """Upsample2D (nearest x2, then 3x3 conv) computed without the upsampled tensor.

    After nearest x2 every output pixel's 3x3 window covers only 2x2 distinct source pixels, so each of the four
    output phases is a 2x2 conv of the source with summed taps: 16 multiply-adds per source pixel instead of 36, and
    the 4x larger upsampled tensor is never written. In the SDXL VAE decoder these convs are 28% of all FLOPs. Exact
    up to the rounding of the summed weights (summed in fp32). Keeps `conv`, so state-dict keys stay the same; the
    summed weights are computed once, so load weights before the swap (optimize after loading)."""

    def __init__(self, up: Upsample2D):
        super().__init__()
        self.conv = up.conv
        w = up.conv.weight  # [O, I, 3, 3]
        taps = _PHASE_TAPS.to(w.device)
        # [a, b, O, I, 2, 2] -> [4*O, I, 2, 2], phases in row-major (a, b) order
        phase_weight = torch.einsum("aik,ockl,bjl->abocij", taps, w.float(), taps)
        phase_weight = phase_weight.reshape(-1, *phase_weight.shape[3:]).to(w.dtype)
        self.register_buffer("phase_weight", phase_weight, persistent=False)
        self.register_buffer("phase_bias", up.conv.bias.repeat(4), persistent=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if size is not None and tuple(size) != (2 * h, 2 * w):  # an odd target size: the plain path
            return self.conv(F.interpolate(x, size=size, mode="nearest"))
        # On x padded by 1, phase (a, b) of output pixel (i, j) is this conv's output at (i + a, j + b).
        y = F.conv2d(x, self.phase_weight, self.phase_bias, padding=1)  # [B, 4*O, h+1, w+1]
        o = y.shape[1] // 4
        layout = torch.channels_last if y.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty(b, o, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=layout)
        for a in range(2):
            for c in range(2):
                p = 2 * a + c
                out[:, :, a::2, c::2] = y[:, p * o : (p + 1) * o, a : a + h, c : c + w]
        return out


class FusedAttention(nn.Module):
    """Attention whose projections run as one matmul (self-attention) or two (cross-attention: q; k and v).

    to_q/to_k/to_v stay as modules whose weights are views of the fused weight: state-dict keys and loading are
    unchanged, and no memory is added. Moving the module to another dtype or device afterwards breaks the sharing
    (the fused copy then goes stale): fuse last.

    Cross-attention keeps the k and v of the last context it saw: every step of a call, and every call with a cached
    prompt (TurboPipeline.prompt_cache), passes the same context tensor, so its k and v are computed once instead of
    per step (SDXL: 70 GEMMs reading 680 MB of weights per UNet call). Eager inference under no_grad only (not with
    autograd, not while torch.compile traces, not for inference_mode tensors, whose changes cannot be seen); the
    result is the same either way, bit for bit. The entry is dropped when the context is freed or changed in place,
    or the weights change."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.heads, self.to_out = attn.heads, attn.to_out
        self.to_q, self.to_k, self.to_v = attn.to_q, attn.to_k, attn.to_v
        projections = (self.to_q, self.to_k, self.to_v)
        if self.to_q.in_features != self.to_k.in_features:  # cross-attention: q reads x; k and v read the context
            projections = projections[1:]
        self.register_buffer("weight", _fuse(projections, "weight"), persistent=False)  # [(2 or 3) * inner, C]
        self.register_buffer("bias", _fuse(projections, "bias"), persistent=False)
        self.is_qkv = len(projections) == 3
        self._context_kv = None  # (weakref to the context, (its, the weight's, the bias' versions), k, v)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        inner = self.to_q.out_features
        if self.is_qkv and context is None:
            q, k, v = F.linear(x, self.weight, self.bias).split(inner, dim=-1)
        else:
            q = self.to_q(x)
            k, v = self._kv(x if context is None else context)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2))

    def _kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inner = self.to_q.out_features
        kv_bias = None if self.bias is None else self.bias[-2 * inner :]  # k and v are the last 2 * inner rows
        cacheable = not (self.is_qkv or torch.is_grad_enabled() or torch.compiler.is_compiling())
        tracked = (context, self.weight) + (() if self.bias is None else (self.bias,))
        if not cacheable or any(t.is_inference() for t in tracked):  # inference tensors have no version counter
            return F.linear(context, self.weight[-2 * inner :], kv_bias).split(inner, dim=-1)
        versions = tuple(t._version for t in tracked)
        memo = self._context_kv
        if memo is None or memo[0]() is not context or memo[1] != versions:
            k, v = F.linear(context, self.weight[-2 * inner :], kv_bias).split(inner, dim=-1)
            memo = self._context_kv = (weakref.ref(context), versions, k, v)
        return memo[2], memo[3]


def _fuse(projections, name: str) -> torch.Tensor | None:
    """Concatenate the Linears' `name` tensors along the output dim; each Linear's becomes a view into the result."""
    if getattr(projections[0], name) is None:
        return None
    fused = torch.cat([getattr(p, name).detach() for p in projections])
    for p, part in zip(projections, fused.split([p.out_features for p in projections])):
        setattr(p, name, nn.Parameter(part, requires_grad=False))
    return fused


def _swap_modules(root: nn.Module, wanted: type, make) -> int:
    """Replace every submodule of exactly type `wanted` by make(module); returns how many."""
    count = 0
    for parent in list(root.modules()):
        for name, child in parent.named_children():
            if type(child) is wanted:
                setattr(parent, name, make(child))
                count += 1
    return count


def use_subpixel_upsample(module: nn.Module) -> int:
    return _swap_modules(module, Upsample2D, SubpixelUpsample2D)


def fuse_attention(module: nn.Module) -> int:
    """UNet attention only: the VAE's single mid-block attention subclasses Attention and gains nothing."""
    return _swap_modules(module, Attention, FusedAttention)


def keep_freed_memory() -> bool:
    """CPU: stop glibc from returning large freed blocks to the OS.

    By default every tensor over 32 MiB is a fresh mmap, zero-filled page by page on first touch and unmapped on
    free: a 512x512 VAE decode takes ~770k page faults (measured), ~10% of its CPU time. Keeping freed memory in the
    heap removes them at the price of a resident high-water mark. Process-wide; returns False where libc is not
    glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def use_compile_cache(path: str | Path | None = None) -> Path:
    """A persistent inductor cache, so a second process starts from compiled kernels instead of recompiling for
    minutes. The folder: `path`, else $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/sdturbo/inductor (inductor's own default
    is under /tmp, which does not survive a reboot)."""
    path = Path(path or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or Path.home() / ".cache" / "sdturbo" / "inductor")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_models(pipe, mode: str | None = None) -> None:
    """torch.compile each network in place (module.compile keeps the objects the pipeline holds).

    Shapes are static (dynamic=False): each new (batch, size) compiles once, then replays. mode "reduce-overhead"
    adds CUDA graphs, which matter at batch 1 where launches outnumber the work; "max-autotune-no-cudagraphs"
    searches GEMM/conv configs at a longer first compile.

    On a CPU only the UNet is compiled, with inductor's freezing (weights become constants of the graph, prepacked
    for oneDNN): measured 6-10% faster per call than eager, where the compiled VAE decoder was slower and the text
    encoders are too short to repay minutes of compiling (BENCHMARKS.md). Frozen weights no longer follow changes to
    the module's parameters."""
    use_compile_cache()
    torch._inductor.config.conv_1x1_as_mm = True  # 1x1 convs (shortcuts) as matmuls, which inductor can fuse into
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # one graph per shape
    modules = [pipe.unet, pipe.vae.decoder, pipe.vae.encoder, pipe.text_encoder, pipe.text_encoder_2]
    if pipe.device.type == "cpu":
        torch._inductor.config.freezing = True
        modules = [pipe.unet]
    for module in modules:
        module.compile(fullgraph=True, dynamic=False, mode=mode)


def optimize(
    pipe,
    *,
    channels_last: bool | None = None,
    subpixel_upsample: bool = True,
    fuse_qkv: bool = True,
    compile: bool = False,
    compile_mode: str | None = None,
    cpu_malloc: bool = True,
):
    """Apply the fast path to a loaded TurboPipeline in place and return it. None picks the device's best value.

    channels_last: NHWC convolutions (CPU: oneDNN's brgemm kernels, no layout reorders around every conv; CUDA:
        cuDNN's tensor-core layout, worth it with compile, whose GroupNorm keeps the layout).
    subpixel_upsample: see SubpixelUpsample2D.
    fuse_qkv: one projection matmul instead of three (CUDA: fewer, fuller kernels; CPU: no change alone), and the
        cross-attentions keep the text context's k and v between steps and calls (FusedAttention).
    compile: torch.compile the networks (see compile_models); minutes on the first call of each shape unless the
        cache is warm (on a CPU, ~2 minutes at every start: frozen graphs gain little from the cache). Off by
        default.
    compile_mode: None picks "reduce-overhead" (CUDA graphs) on CUDA, inductor's default on CPU.
    cpu_malloc: on CPU, keep_freed_memory(). On CUDA, cuDNN's autotuner is switched on (process-wide)."""
    cuda = pipe.device.type == "cuda"
    if channels_last is None:
        channels_last = not cuda or compile
    if fuse_qkv:
        fuse_attention(pipe.unet)
    if subpixel_upsample:
        use_subpixel_upsample(pipe.unet)
        use_subpixel_upsample(pipe.vae)
    if channels_last:
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.channels_last)  # 4-d parameters and buffers only
    if cuda:
        torch.backends.cudnn.benchmark = True  # static shapes: time the conv algorithms once per shape, keep the best
    elif cpu_malloc:
        keep_freed_memory()
    if compile:
        compile_models(pipe, compile_mode or ("reduce-overhead" if cuda else None))
    return pipe
