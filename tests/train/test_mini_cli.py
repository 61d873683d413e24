"""`sdturbo train mini` without training: where the export goes by default, and mistakes (a stage run before the
ones it needs, a bad --steps-scale) reported in one line. The recipe itself runs in test_mini.py."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdturbo.cli import main
from sdturbo.pipeline import MINI_MODEL_DIR
from sdturbo.train.mini import checkpoint, stages
from sdturbo.train.mini.cli import add_train_arguments, run_train


def one_error_line(capsys, *argv: str) -> str:
    assert main(["train", "mini", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_default_export_dir_is_the_bundled_model_wherever_it_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipes = []
    monkeypatch.setattr(stages, "run_stage", lambda name, workdir, recipe: recipes.append(recipe) or 0.0)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    run_train(parser.parse_args(["--stage", "export", "--workdir", str(tmp_path / "work")]))
    assert Path(recipes[0].export_dir) == MINI_MODEL_DIR and MINI_MODEL_DIR.is_absolute()
    run_train(parser.parse_args(["--stage", "export", "--export-dir", "elsewhere"]))
    assert recipes[1].export_dir == "elsewhere"


def test_a_stage_before_its_inputs_is_one_error_line(tmp_path, capsys):
    work = tmp_path / "work"
    line = one_error_line(capsys, "--stage", "clip", "--workdir", str(work))
    assert "no data cache" in line and "--stage data" in line
    line = one_error_line(capsys, "--stage", "export", "--workdir", str(work))
    assert "stage 'clip' has not finished" in line and "--stage clip" in line


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf"])
def test_steps_scale_must_be_positive_and_finite(scale, tmp_path, capsys):
    line = one_error_line(capsys, "--stage", "clip", "--steps-scale", scale, "--workdir", str(tmp_path / "work"))
    assert "--steps-scale must be a positive finite number" in line
    assert not (tmp_path / "work").exists()


def test_module_entry_point_reports_errors_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    done = subprocess.run([sys.executable, "-m", "sdturbo.train.mini", "--stage", "clip", "--workdir",
                           str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: no data cache"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_stage_checkpoints_get_the_mode_of_other_new_files(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "stage.safetensors", {"step": 1, "w": torch.zeros(2)})
    (tmp_path / "other").write_text("")
    assert (tmp_path / "stage.safetensors").stat().st_mode == (tmp_path / "other").stat().st_mode
