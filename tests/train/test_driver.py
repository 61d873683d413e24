"""`sdturbo train add` in one process on a TINY teacher: the run's outputs, exact resume and resume with changed
settings, the bf16 path on folder data, the command line, the export of flat tokenizers, and activation
checkpointing's gradients."""

import argparse
import json
import math
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from add_fixtures import build, stream_batch
from sdturbo.pipeline import TurboPipeline
from sdturbo.train.driver import (
    TrainAddConfig,
    add_train_add_arguments,
    check_inputs,
    config_from_args,
    tokenizer_source,
    train,
    truncate_log,
)
from sdturbo.train.driver import main as driver_main
from sdturbo.train.loop import ADDConfig, step_generator, student_forward
from sdturbo.train.parallel import apply_activation_checkpointing

LOSSES = ("d_loss", "d_real", "d_fake", "r1", "g_loss", "g_adv", "g_distill")
PROMPTS = ("a red circle", "a blue square on a white background")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these small ops run fastest that way on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(teacher, out, **changes) -> TrainAddConfig:
    base = TrainAddConfig(
        teacher=str(teacher), out=str(out), steps=3, batch_size=2, discriminator="tiny", precision="fp32",
        device="cpu", checkpoint_every=2, sample_every=2, sample_prompts=PROMPTS, export_dtype="fp32",
        add=ADDConfig(lr_student=1e-4, lr_discriminator=1e-3, seed=3),
    )
    return replace(base, **changes)


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tiny_teacher, tmp_path_factory):
    """3 steps on shapes: checkpoints after steps 2 and 3, sample grids at 0, 2 and 3."""
    out = tmp_path_factory.mktemp("add") / "run"
    final = train(config(tiny_teacher, out))
    return out, final


def test_log_has_every_loss_term_of_every_step(run):
    out, _ = run
    log = read_log(out)
    assert [r["step"] for r in log] == [0, 1, 2]
    for record in log:
        assert all(math.isfinite(record[k]) for k in LOSSES), record
        assert record["step_s"] > 0
    assert json.loads((out / "config.json").read_text())["add"]["lr_student"] == 1e-4


def test_checkpoints_and_sample_grids(run):
    out, _ = run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    assert json.loads((out / "checkpoints" / "step_0000003" / "state.json").read_text())["step"] == 3
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step_0000000.png", "step_0000002.png", "step_0000003.png"]
    with Image.open(out / "samples" / grids[-1]) as grid:
        assert grid.size == (2 * 64, 64)  # two prompts side by side at the teacher's 64 px
    first, last = (np.asarray(Image.open(out / "samples" / g)) for g in (grids[0], grids[-1]))
    assert not np.array_equal(first, last)  # the student moved


def test_final_is_the_ema_student_and_generates(run):
    out, final = run
    exported = load_file(str(final / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(out / "checkpoints" / "step_0000003" / "student_ema.safetensors"))
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    pipe = TurboPipeline.from_pretrained(final, device="cpu", dtype="fp32")
    image = pipe(PROMPTS[0], seed=0, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_resume_reproduces_the_next_step(run, tiny_teacher, tmp_path):
    out, _ = run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000003")  # back to the state after step 2
    train(config(tiny_teacher, resumed, resume=True, sample_every=0))
    original, again = read_log(out)[2], read_log(resumed)[2]
    assert again["step"] == 2 and len(read_log(resumed)) == 3
    assert {k: again[k] for k in LOSSES} == pytest.approx({k: original[k] for k in LOSSES}, rel=1e-6, abs=1e-9)
    for name in ("student", "student_ema", "discriminator_heads"):
        a = load_file(str(out / "checkpoints" / "step_0000003" / f"{name}.safetensors"))
        b = load_file(str(resumed / "checkpoints" / "step_0000003" / f"{name}.safetensors"))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_ctrl_c_finishes_the_step_checkpoints_it_and_resume_goes_on(tiny_teacher, tmp_path, monkeypatch, capsys):
    import os
    import signal

    from sdturbo.train import driver

    def interrupted_step(models, optimizers, batch, add, step):  # Ctrl+C arrives in the middle of step 1
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(models, optimizers, batch, add, step)

    train_step = driver.train_step
    monkeypatch.setattr(driver, "train_step", interrupted_step)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_teacher, out, steps=5, checkpoint_every=10))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]  # step 1 finished, then saved
    assert "the newest checkpoint is" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    monkeypatch.setattr(driver, "train_step", train_step)
    train(config(tiny_teacher, out, steps=5, checkpoint_every=10, resume=True))
    assert [r["step"] for r in read_log(out)] == [0, 1, 2, 3, 4]
    train(config(tiny_teacher, out, steps=5, checkpoint_every=10, resume=True))
    assert "already at step 5 of --steps 5: nothing to train" in capsys.readouterr().err


def test_out_folder_is_never_mixed(run, tiny_teacher, tmp_path):
    out, _ = run
    with pytest.raises(ValueError, match="--resume"):
        train(config(tiny_teacher, out))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(config(tiny_teacher, tmp_path / "empty", resume=True))


@pytest.mark.parametrize("changes, message", [
    ({"feature_net": "missing.safetensors"}, "--feature-net missing.safetensors does not exist"),
    ({"image_net": "missing.safetensors"}, "--image-net missing.safetensors does not exist"),
    ({"data": "missing"}, "--data missing is not a folder"),
    ({"student": "missing"}, "--student missing does not exist"),
])
def test_bad_input_paths_fail_before_anything_is_written(changes, message, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        train(config(tiny_teacher, tmp_path / "run", **changes))
    assert list(tmp_path.iterdir()) == []


def test_data_folder_without_captions_leaves_no_run_behind(tiny_teacher, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="no image with a same-name .txt caption"):
        train(config(tiny_teacher, tmp_path / "run", data=str(tmp_path / "data")))
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_refused(tiny_teacher, tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(ValueError, match="--out .* is a file"):
        train(config(tiny_teacher, tmp_path / "run"))


def test_random_dinov2_features_are_warned_about(tiny_teacher, tmp_path):
    with pytest.warns(UserWarning, match="without --feature-net .* facebook/dinov2-small"):
        check_inputs(config(tiny_teacher, tmp_path, discriminator="dinov2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_inputs(config(tiny_teacher, tmp_path))  # tiny: random features are its purpose


@pytest.fixture
def caption_folder(tmp_path):
    """Two captioned images of other sizes than the training size."""
    rng = np.random.default_rng(0)
    for name, size in (("a", (80, 64)), ("b", (64, 100))):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a photo number {name}\n")
    return tmp_path


def test_bf16_autocast_step_on_folder_data_is_finite(tiny_teacher, caption_folder, tmp_path):
    out = tmp_path / "bf16"
    train(config(tiny_teacher, out, data=str(caption_folder), steps=1, precision="bf16",
                 activation_checkpointing=True, sample_every=0))
    (record,) = read_log(out)
    assert all(math.isfinite(record[k]) for k in LOSSES), record
    assert record["d_loss"] != round(record["d_loss"])  # losses are reduced in fp32, not rounded like bf16
    student = load_file(str(out / "checkpoints" / "step_0000001" / "student.safetensors"))
    assert {t.dtype for t in student.values()} == {torch.float32}  # master weights stay fp32


def test_command_line_sets_fields_and_add_overrides():
    parser = argparse.ArgumentParser()
    add_train_add_arguments(parser)
    args = parser.parse_args([
        "--teacher", "mini", "--out", "runs/x", "--steps", "7", "--batch-size", "3", "--resume",
        "--activation-checkpointing", "--sample-prompts", "a cat", "a dog, sitting",
        "--add.lr-student", "3e-6", "--add.student-timesteps", "999", "499", "--add.betas-discriminator", "0", "0.9",
    ])
    cfg = config_from_args(args)
    assert (cfg.teacher, cfg.out, cfg.steps, cfg.batch_size, cfg.resume) == ("mini", "runs/x", 7, 3, True)
    assert cfg.activation_checkpointing and cfg.sample_prompts == ("a cat", "a dog, sitting")
    assert cfg.add == ADDConfig(lr_student=3e-6, student_timesteps=(999, 499), betas_discriminator=(0.0, 0.9))
    assert cfg.data == "shapes" and cfg.precision == "bf16"  # untouched defaults
    with pytest.raises(ValueError, match="precision"):
        TrainAddConfig(teacher="mini", out="x", precision="fp8")


def _student_gradients(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a loss on the decoded student output, and the bytes autograd kept for backward."""
    models, _ = build()
    if checkpointing:
        apply_activation_checkpointing(models.student, models.vae)
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = student_forward(models, stream_batch(0), ADDConfig(), step_generator(0, 0, 0))
        loss = out.image.square().mean() + out.latent.square().mean()
    loss.backward()
    return {n: p.grad for n, p in models.student.named_parameters()}, saved


def test_activation_checkpointing_keeps_gradients_and_saves_memory():
    plain, saved_plain = _student_gradients(checkpointing=False)
    recomputed, saved_recomputed = _student_gradients(checkpointing=True)
    assert plain.keys() == recomputed.keys()  # parameter names unchanged
    torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-8)
    assert saved_recomputed < saved_plain / 2, (saved_recomputed, saved_plain)


def test_flat_tokenizer_folder_is_exported_as_one_folder_per_tower(tiny_teacher, tmp_path):
    flat = tmp_path / "flat"  # one vocab.json + merges.txt, which loading reads for both towers
    flat.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tiny_teacher / "tokenizer" / name, flat / name)
    final = train(config(tiny_teacher, tmp_path / "run", tokenizer=str(flat), steps=1, sample_every=0))
    trained = TurboPipeline.from_pretrained(tiny_teacher, device="cpu", dtype="fp32", tokenizer=str(flat))
    exported = TurboPipeline.from_pretrained(final, device="cpu", dtype="fp32")
    for tokenizer in ("tokenizer", "tokenizer_2"):
        ids, expected = getattr(exported, tokenizer)(PROMPTS[0]), getattr(trained, tokenizer)(PROMPTS[0])
        assert torch.equal(ids, expected), tokenizer
    assert exported.tokenizer.pad_token_id == exported.tokenizer.eos_token_id and exported.tokenizer_2.pad_token_id == 0


def test_a_tokenizer_folder_the_export_cannot_ship_fails_before_training(tiny_teacher, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")  # loads, but there is nothing to copy for the export
    with pytest.raises(ValueError, match="neither tokenizer/ and tokenizer_2/ nor vocab.json and merges.txt"):
        tokenizer_source(config(tiny_teacher, tmp_path / "run", tokenizer=str(tmp_path / "tok")))


@pytest.mark.filterwarnings("ignore:--discriminator dinov2 without --feature-net")
def test_resume_with_changed_ema_data_and_discriminator(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    no_ema = replace(config(tiny_teacher, out).add, ema_decay=0.0)
    train(config(tiny_teacher, out, steps=1, checkpoint_every=1, sample_every=0, add=no_ema))
    assert not (out / "checkpoints" / "step_0000001" / "student_ema.safetensors").exists()
    capsys.readouterr()
    with pytest.raises(ValueError, match="discriminator was tiny .* resume with --discriminator tiny"):
        train(config(tiny_teacher, out, steps=2, resume=True, discriminator="dinov2"))
    train(config(tiny_teacher, out, steps=2, sample_every=0, resume=True, batch_size=1))  # EMA on, smaller batches
    err = capsys.readouterr().err
    assert "the EMA starts from the student of step 1" in err
    assert "changed data settings (saved -> now): {'batch_size': (2, 1)}" in err and "differ" in err
    assert (out / "checkpoints" / "step_0000002" / "student_ema.safetensors").exists()


def test_truncate_log_drops_a_last_line_cut_short_and_names_other_bad_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "g_loss": 1.0}\n{"step": 1, "g_loss": 1.0}\n{"step": 2, "g_lo')
    with pytest.warns(UserWarning, match=r"log.jsonl ends in a line cut short \(line 3"):
        truncate_log(log, 2)
    assert read_log(tmp_path) == [{"step": 0, "g_loss": 1.0}, {"step": 1, "g_loss": 1.0}]
    log.write_text('{"step": 0}\n{"step": 1, "g_lo\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl line 2 is not JSON .* repair or delete that line"):
        truncate_log(log, 2)
    log.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2 has no step"):
        truncate_log(log, 2)


def test_module_entry_point_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # run_command installs its one-line form
    assert driver_main(["--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --teacher") and "does not exist" in err[0]


def test_weight_files_get_the_mode_of_other_new_files(run):
    out, final = run
    mode = (out / "config.json").stat().st_mode & 0o777  # written with open(): the umask's mode
    weights = [*(out / "checkpoints").rglob("*.safetensors"), *final.rglob("*.safetensors")]
    assert weights and {oct(p.stat().st_mode & 0o777) for p in weights} == {oct(mode)}
