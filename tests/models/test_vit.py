"""DINOv2 ViT: official checkpoint keys and shapes (on the meta device), safetensors loading, and parity with
transformers' Dinov2Model on random weights."""

import pytest
import torch
from safetensors.torch import save_file

from sdturbo.models.vit import DINOV2_VITL14, DINOV2_VITS14, TINY_VIT, ViT, ViTConfig, imagenet_normalize, load_vit

transformers = pytest.importorskip("transformers")

# transformers >= 5 renames the attention modules on load; the official model.safetensors files keep these names.
OFFICIAL_NAMES = (
    ("attention.q_proj", "attention.attention.query"),
    ("attention.k_proj", "attention.attention.key"),
    ("attention.v_proj", "attention.attention.value"),
    ("attention.o_proj", "attention.output.dense"),
)


def hf_config(cfg: ViTConfig):
    return transformers.Dinov2Config(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        mlp_ratio=cfg.intermediate_size // cfg.hidden_size,
        layer_norm_eps=cfg.layer_norm_eps,
    )


def official_name(key: str) -> str:
    for new, old in OFFICIAL_NAMES:
        key = key.replace(new, old)
    return key


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("cfg", [DINOV2_VITS14, DINOV2_VITL14], ids=["vits14", "vitl14"])
def test_official_keys_and_shapes(cfg):
    with torch.device("meta"):
        ours = ViT(cfg)
        reference = transformers.Dinov2Model(hf_config(cfg))
    expected = {official_name(k): v for k, v in shapes(reference).items()}
    assert expected.pop("embeddings.mask_token") == (1, cfg.hidden_size)  # pretraining only; dropped on load
    assert shapes(ours) == expected
    assert expected["embeddings.position_embeddings"] == (1, 37 * 37 + 1, cfg.hidden_size)  # 518 px / 14


def test_vits14_key_count():
    # 5 embedding tensors (cls, mask, positions, patch conv weight + bias) + 18 per block + final norm (2)
    assert len(shapes(ViT(TINY_VIT))) == 4 + 18 * TINY_VIT.num_layers + 2
    with torch.device("meta"):
        assert len(shapes(ViT(DINOV2_VITS14))) + 1 == 5 + 18 * 12 + 2


def random_reference(cfg: ViTConfig) -> tuple[ViT, "transformers.Dinov2Model"]:
    torch.manual_seed(0)
    reference = transformers.Dinov2Model(hf_config(cfg)).eval()
    with torch.no_grad():  # layer scales start at 1; randomise them so the test sees them
        for name, p in reference.named_parameters():
            if "lambda1" in name:
                p.uniform_(0.5, 1.5)
    ours = ViT(cfg)
    state = {official_name(k): v for k, v in reference.state_dict().items()}
    state.pop("embeddings.mask_token")
    ours.load_state_dict(state, strict=True)
    return ours.eval(), reference


@pytest.mark.parametrize("size_px", [56, 28, 42], ids=["native", "smaller", "interpolated"])
def test_parity_with_transformers(size_px):
    ours, reference = random_reference(TINY_VIT)
    pixels = imagenet_normalize(torch.rand(2, 3, size_px, size_px, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True)
        states = ours.hidden_states(pixels)
        pooled = ours(pixels)
    assert len(states) == len(expected.hidden_states) == TINY_VIT.num_layers + 1
    for got, want in zip(states, expected.hidden_states):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, expected.pooler_output, atol=1e-5, rtol=1e-5)


def test_hidden_states_stop_at_depth():
    vit = ViT(TINY_VIT)
    pixels = torch.randn(1, 3, 56, 56)
    assert len(vit.hidden_states(pixels, depth=2)) == 3
    torch.testing.assert_close(vit.hidden_states(pixels, depth=2)[-1], vit.hidden_states(pixels)[2])


def test_load_vit_from_an_official_style_file(tmp_path):
    _, reference = random_reference(TINY_VIT)
    path = tmp_path / "model.safetensors"
    save_file({official_name(k): v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    vit = load_vit(str(path), TINY_VIT)
    assert not any(p.requires_grad for p in vit.parameters())
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(vit(pixels), reference(pixels).pooler_output, atol=1e-5, rtol=1e-5)


def test_load_vit_is_strict(tmp_path):
    state = ViT(TINY_VIT).state_dict()
    state.pop("layernorm.weight")
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(RuntimeError, match="layernorm.weight"):
        load_vit(str(path), TINY_VIT)
