"""sdturbo-mini's recipe end to end at toy sizes: every stage runs a couple of steps, resumes after a kill, and the
exported folder loads with TurboPipeline.from_pretrained and generates."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdturbo.tokenizer import CLIPTokenizer
from sdturbo.train.mini import checkpoint as checkpoint_module
from sdturbo.train.mini import teacher as teacher_module
from sdturbo.train.mini.cli import add_train_arguments
from sdturbo.train.mini.config import MINI, MiniRecipe
from sdturbo.train.mini.stages import ABLATION_STAGES, STAGES, run_stage

pytestmark = pytest.mark.slow


def toy_recipe(export_dir: Path) -> MiniRecipe:
    recipe = MiniRecipe().scaled(0.001)  # 2 steps per stage
    return replace(
        recipe,
        data=replace(recipe.data, num_images=16, tokenizer_captions=300),
        clip=replace(recipe.clip, batch_size=4),
        vae=replace(recipe.vae, batch_size=2, scale_images=4),
        vae_decoder=replace(recipe.vae_decoder, batch_size=2),
        teacher=replace(recipe.teacher, batch_size=2),
        vit=replace(recipe.vit, batch_size=4),
        student=replace(recipe.student, batch_size=2, warm_batch_size=2),
        export_dir=str(export_dir),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, MiniRecipe]:
    root = tmp_path_factory.mktemp("mini")
    recipe = toy_recipe(root / "export")
    for name in STAGES:
        if name != "export":
            run_stage(name, root / "work", recipe)
    return root / "work", recipe


def test_tokenizer_is_clip_format(trained):
    workdir, _ = trained
    tok1, tok2 = (CLIPTokenizer.from_folder(workdir / name) for name in ("tokenizer", "tokenizer_2"))
    ids1, ids2 = tok1("a red circle"), tok2("a red circle")
    assert ids1[0, 0] == tok1.bos_token_id and tok1.eos_token_id in ids1[0].tolist()
    assert ids1[0, -1] == tok1.eos_token_id  # tokenizer/ pads with eos
    assert ids2[0, -1] == tok2.pad_token_id == 0  # tokenizer_2/ pads with "!"
    assert tok1.eos_token_id < MINI.text_encoder.vocab_size


def test_teacher_resumes_after_a_kill(trained, monkeypatch):
    workdir, recipe = trained
    (workdir / "teacher.safetensors").unlink()
    recipe = replace(recipe, teacher=replace(recipe.teacher, steps=3, save_every=1))
    saves = []

    def save_then_die(path, state):
        checkpoint_module.save_checkpoint(path, state)
        saves.append(state["step"])
        if len(saves) == 1:
            raise KeyboardInterrupt  # killed right after the first save

    monkeypatch.setattr(teacher_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage("teacher", workdir, recipe)
    run_stage("teacher", workdir, recipe)
    assert saves == [1, 2, 3]  # the second run started at step 1, not 0
    assert checkpoint_module.load_checkpoint(workdir / "teacher.safetensors")["done"]


def test_export_loads_and_generates(trained):
    from sdturbo.pipeline import TurboPipeline

    workdir, recipe = trained
    run_stage("export", workdir, recipe)
    export_dir = Path(recipe.export_dir)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (export_dir / sub).is_dir()
    pipe = TurboPipeline.from_pretrained(export_dir, device="cpu", dtype=torch.float32)
    image = pipe("a red circle", num_inference_steps=1, seed=0, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert (workdir / "samples_student.png").exists()


def test_export_budget_counts_only_the_model(trained, tmp_path, monkeypatch):
    from sdturbo.train.mini import export as export_module

    workdir, recipe = trained
    export_dir = tmp_path / "shared"
    export_dir.mkdir()
    (export_dir / "unrelated.bin").write_bytes(bytes(26 * 2**20))  # alone over the 25 MiB budget
    run_stage("export", workdir, replace(recipe, export_dir=str(export_dir)))
    assert (export_dir / "unet").is_dir() and (export_dir / "unrelated.bin").exists()
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(export_module, "MAX_EXPORT_BYTES", 1024)
    with pytest.raises(ValueError, match="over the 25 MiB budget"):
        run_stage("export", workdir, replace(recipe, export_dir=str(fresh)))
    assert not fresh.exists()  # a model over the budget is never written


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--stage", "vae", "--steps-scale", "0.5"])
    assert (args.stage, args.steps_scale, args.workdir) == ("vae", 0.5, Path("runs/mini"))
    assert MiniRecipe().scaled(0.5).teacher.steps == MiniRecipe().teacher.steps // 2


def test_ablation_students_and_eval_models_dir(trained, tmp_path):
    from sdturbo.eval.models import write_models_dir
    from sdturbo.pipeline import TurboPipeline
    from sdturbo.train.mini.student import load_student

    workdir, recipe = trained
    for name in ABLATION_STAGES:
        run_stage(name, workdir, recipe)
    add, adv_only, distill_only = (load_student(workdir, v) for v in ("add", "adv-only", "distill-only"))
    # same warm start and batches, different objectives: three different students
    weights = [m.conv_out.weight for m in (add, adv_only, distill_only)]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert not torch.equal(weights[1], weights[2])
    written = write_models_dir(workdir, tmp_path / "models")
    assert sorted(p.name for p in written) == ["add", "adv-only", "distill-only", "teacher"]
    pipe = TurboPipeline.from_pretrained(tmp_path / "models" / "distill-only", device="cpu", dtype=torch.float32)
    assert pipe("a red circle", num_inference_steps=1, seed=0, output_type="pt").images.shape == (1, 3, 64, 64)
