"""The evaluation run: real scenes for every prompt form, and the JSON a run writes, on a tiny random model."""

import argparse
import json

import numpy as np
import pytest
import torch

from sdturbo.eval.cli import DEFAULT_MODELS_DIR, add_eval_arguments, check_args, format_table, run_eval
from sdturbo.eval.networks import EvalNet, save_eval_net
from sdturbo.eval.run import ROW_NAMES, eval_prompts, folder_loader, scene_for
from sdturbo.loading import save_diffusers_folder
from sdturbo.models.clip import CLIPTextModel
from sdturbo.models.unet import UNet
from sdturbo.models.vae import AutoencoderKL
from sdturbo.pipeline import MINI_MODEL_DIR
from sdturbo.train.data import HELDOUT_PROMPTS, parse_caption, scene_satisfies
from sdturbo.train.mini.config import MINI
from sdturbo.train.mini.tokenizer import clip_vocab, write_tokenizer_folder


def test_rows_are_named_as_the_issue_asks():
    assert ROW_NAMES == ("teacher-50-cfg", "teacher-4", "teacher-1", "add-4", "add-1", "adv-only-1", "distill-only-1")


def test_prompts_cycle_through_the_heldout_set():
    prompts = eval_prompts(45)
    assert prompts[:20] == list(HELDOUT_PROMPTS) and prompts[40] == HELDOUT_PROMPTS[0]


@pytest.mark.parametrize("prompt", HELDOUT_PROMPTS)
def test_real_scenes_satisfy_their_prompt_and_vary(prompt):
    rng = np.random.default_rng(0)
    spec = parse_caption(prompt)
    scenes = [scene_for(spec, rng) for _ in range(30)]
    assert all(scene_satisfies(s, spec) for s in scenes)
    assert len({s.objects[0].center for s in scenes}) == 30


@pytest.fixture(scope="module")
def tiny_models_dir(tmp_path_factory):
    """models/add/: a random-weights model in sdturbo-mini's sizes, with a bytes-only tokenizer."""
    root = tmp_path_factory.mktemp("eval-models")
    vocab = clip_vocab([])
    folders = [write_tokenizer_folder(root / "tok" / name, vocab, [], pad) for name, pad in
               (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))]
    torch.manual_seed(0)
    components = {
        "unet": UNet(MINI.unet),
        "text_encoder": CLIPTextModel(MINI.text_encoder, eos_token_id=len(vocab) - 1),
        "text_encoder_2": CLIPTextModel(MINI.text_encoder_2, eos_token_id=len(vocab) - 1),
        "vae": AutoencoderKL(MINI.vae),
    }
    save_diffusers_folder(root / "models" / "add", components, MINI, tokenizer_folders=folders)
    return root / "models"


@pytest.mark.slow
def test_run_eval_writes_the_rows_and_marks_missing_models(tiny_models_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "eval.json"
    net = save_eval_net(EvalNet(), tmp_path / "eval_net.safetensors")  # random: this test is about the plumbing
    args = parser.parse_args(["--json", str(out), "--num-images", "4", "--rows", "add-1", "teacher-1",
                              "--models-dir", str(tiny_models_dir), "--batch-size", "2", "--device", "cpu",
                              "--eval-net", str(net)])
    assert run_eval(args) == 0
    result = json.loads(out.read_text())
    teacher, add = result["rows"]  # in the issue's row order, whatever the order asked
    assert [teacher["name"], add["name"]] == ["teacher-1", "add-1"]
    assert {"name", "steps", "fid", "alignment", "seconds_per_image"} <= add.keys()
    assert add["steps"] == 1 and add["fid"] >= 0 and 0 <= add["alignment"] <= 1 and add["seconds_per_image"] > 0
    assert add["model_dir"] == str((tiny_models_dir / "add").resolve())
    assert teacher["fid"] is None and teacher["alignment"] is None and "not found" in teacher["note"]
    assert teacher["model_dir"] is None
    assert [r["name"] for r in result["references"]] == ["real", "vae-reconstruction"]
    assert "| add-1 | 1 |" in format_table(result)


def test_loaded_models_say_where_they_came_from(tiny_models_dir, tmp_path):
    pipe, where = folder_loader(tiny_models_dir, {"add": MINI_MODEL_DIR}, device="cpu")("add")
    assert where == str((tiny_models_dir / "add").resolve()) and pipe.device.type == "cpu"
    empty = tmp_path / "models"
    empty.mkdir()
    assert folder_loader(empty, {"add": MINI_MODEL_DIR}, device="cpu")("add")[1] == "bundled sdturbo-mini"
    assert folder_loader(empty, {}, device="cpu")("teacher") is None


def eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--num-images", "1"], "--num-images must be at least 2"),
    (["--eval-net", "missing.safetensors"], "--eval-net missing.safetensors does not exist"),
    (["--models-dir", "missing"], "--models-dir missing is not a folder"),
    (["--json", "."], "--json . is a folder"),
    (["--json", "missing/eval.json"], "--json: folder missing does not exist"),
])
def test_bad_arguments_fail_before_the_run(flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = eval_args("--json", "eval.json", "--num-images", "2", "--rows", "add-1", "--device", "cpu", *flags)
    with pytest.raises(ValueError, match=message):
        run_eval(args)
    assert list(tmp_path.iterdir()) == []


def test_absent_default_models_dir_is_reported_not_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="only the add rows run"):
        assert check_args(eval_args("--json", "eval.json")) == DEFAULT_MODELS_DIR
