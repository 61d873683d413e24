"""Tiny random SDXL checkpoints in both layouts, written by sdturbo's own save functions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_checkpoints import random_state_dicts

from sdturbo.loading import save_diffusers_folder, save_single_file
from sdturbo.models.configs import TINY


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: waking torch's worker threads costs more than the work (50x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    return random_state_dicts(TINY)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_state_dicts, tokenizer_folders) -> Path:
    """A diffusers folder (plain fp32 weights) with sdxl-turbo's tokenizer layout."""
    return save_diffusers_folder(tmp_path_factory.mktemp("tiny") / "sdxl", tiny_state_dicts, TINY, tokenizer_folders)


@pytest.fixture(scope="session")
def tiny_single_file(tmp_path_factory, tiny_state_dicts) -> Path:
    return save_single_file(tmp_path_factory.mktemp("tiny_sgm") / "tiny.safetensors", tiny_state_dicts, TINY)
