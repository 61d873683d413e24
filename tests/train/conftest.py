"""A TINY teacher with random weights as a diffusers folder (tokenizers included), for the driver tests."""

from pathlib import Path

import pytest
import torch

from sdturbo.loading import save_diffusers_folder
from sdturbo.models.clip import CLIPTextModel
from sdturbo.models.configs import TINY
from sdturbo.models.unet import UNet
from sdturbo.models.vae import AutoencoderKL


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tokenizer_folders) -> Path:
    torch.manual_seed(0)
    models = {
        "unet": UNet(TINY.unet),
        "text_encoder": CLIPTextModel(TINY.text_encoder),
        "text_encoder_2": CLIPTextModel(TINY.text_encoder_2),
        "vae": AutoencoderKL(TINY.vae),
    }
    return save_diffusers_folder(tmp_path_factory.mktemp("teacher") / "tiny", models, TINY, tokenizer_folders)
