"""CLIP text encoder, one class for both SDXL towers: CLIP ViT-L/14 (TE1) and OpenCLIP bigG/14 (TE2, with projection).

Parameter names equal the transformers checkpoints in a diffusers folder (`text_model.…`, `text_projection.weight`),
so text_encoder/ and text_encoder_2/ load by identity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdturbo.models.configs import TextEncoderConfig

EOS_TOKEN_ID = 49407  # "<|endoftext|>" in the CLIP vocab


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions are always 0..L-1, so slice the table instead of keeping a position_ids buffer
        # (merged checkpoints carry corrupted float copies of it).
        seq_len = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:seq_len]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with transformers' names (q_proj, k_proj, v_proj, out_proj; all biased)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            proj(x).view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, heads, N, head_dim]
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers))


class CLIPTextTransformer(nn.Module):
    """The `text_model.` part of the checkpoint: embeddings, encoder layers and the final LayerNorm."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B, L] ids -> [B] index of the first eos in each row.

    transformers takes argmax(ids) when every row's maximum is the eos id (CLIP's eos 49407 is the largest id) and the
    first eos otherwise; argmax returns the first maximum, so both are this one rule, computed without a
    data-dependent branch (no host sync, graph-capturable)."""
    return (input_ids == eos_token_id).int().argmax(dim=-1)


class CLIPTextModel(nn.Module):
    """input_ids [B, L<=77] -> (penultimate hidden state [B, L, hidden], pooled [B, projection_dim] or None).

    The penultimate state is the input of the last layer, without the final LayerNorm (SDXL's context for both
    towers). The pooled vector (TE2 only) is the final-LayerNorm'd last-layer output at the first eos, projected."""

    def __init__(self, cfg: TextEncoderConfig, eos_token_id: int = EOS_TOKEN_ID):
        super().__init__()
        self.cfg = cfg
        self.eos_token_id = eos_token_id
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        else:
            self.text_projection = None

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        *penultimate_layers, last_layer = self.text_model.encoder.layers
        x = self.text_model.embeddings(input_ids)  # [B, L, hidden]
        for layer in penultimate_layers:
            x = layer(x)
        if self.text_projection is None:
            # TE1: the last layer's output only feeds the pooled vector, which SDXL never uses; its weights stay
            # in the state dict so checkpoints load strictly.
            return x, None
        return x, self.pool(last_layer(x), input_ids)

    def pool(self, last_hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Last-layer output [B, L, hidden] -> projected eos embedding [B, projection_dim]."""
        rows = torch.arange(last_hidden.shape[0], device=last_hidden.device)
        eos_hidden = last_hidden[rows, eos_positions(input_ids, self.eos_token_id).to(last_hidden.device)]
        # LayerNorm is per token, so normalising only the gathered eos rows gives the same values.
        return self.text_projection(self.text_model.final_layer_norm(eos_hidden))


def text_config_from_transformers(config_json: dict) -> TextEncoderConfig:
    """A transformers CLIPTextConfig dict (text_encoder*/config.json) -> TextEncoderConfig. Only
    CLIPTextModelWithProjection uses its projection; CLIPTextModel's projection_dim is a leftover."""
    with_projection = "CLIPTextModelWithProjection" in config_json.get("architectures", [])
    return TextEncoderConfig(
        vocab_size=config_json["vocab_size"],
        hidden_size=config_json["hidden_size"],
        intermediate_size=config_json["intermediate_size"],
        num_layers=config_json["num_hidden_layers"],
        num_heads=config_json["num_attention_heads"],
        max_position_embeddings=config_json["max_position_embeddings"],
        hidden_act=config_json["hidden_act"],
        layer_norm_eps=config_json["layer_norm_eps"],
        projection_dim=config_json["projection_dim"] if with_projection else None,
    )


def text_config_to_transformers(
    cfg: TextEncoderConfig, with_projection: bool, eos_token_id: int = EOS_TOKEN_ID
) -> dict:
    """TextEncoderConfig -> a CLIPTextConfig dict for CLIPTextModel or CLIPTextModelWithProjection.

    eos_token_id is written as the real id so transformers pools at the first eos, as this module does (the official
    configs carry the legacy 2, which makes transformers pool at argmax(ids): the same position for CLIP tokenizer
    output)."""
    if with_projection and cfg.projection_dim is None:
        raise ValueError("with_projection=True needs a TextEncoderConfig with projection_dim")
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        # CLIPTextModel ignores projection_dim; the official TE1 config stores its width there.
        "projection_dim": cfg.projection_dim if cfg.projection_dim is not None else cfg.hidden_size,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "eos_token_id": eos_token_id,
    }
