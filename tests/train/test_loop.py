"""ADD training loop on TINY components: 20 finite steps that teach the discriminator, exact resume, the teacher
variants."""

import json

import pytest
import torch

from add_fixtures import CFG, SIZE_PX, build, make_batch, stream_batch, text_embeddings
from sdturbo.models.configs import TINY
from sdturbo.train.add import hinge_d_loss_real
from sdturbo.train.data import ShapesStream
from sdturbo.train.loop import (
    ADDBatch,
    ADDConfig,
    Conditioning,
    load_checkpoint,
    save_checkpoint,
    step_generator,
    student_forward,
    teacher_latent_target,
    train_step,
    unet_conditioning,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these small ops run fastest that way on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def real_loss(models, batch: ADDBatch) -> float:
    """The discriminator's hinge loss on real images, with fixed augmentation draws."""
    disc = models.discriminator.eval()  # eval: spectral norm does not advance its power iteration
    c_img = disc.image_condition(batch.image)
    features = disc.features(batch.image, torch.Generator().manual_seed(0))
    loss = hinge_d_loss_real(disc.heads_logits(features, batch.c_text, c_img)).item()
    disc.train()
    return loss


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """20 steps; the state after 10 steps is saved."""
    models, optimizers = build()
    held_out = stream_batch(1000)
    checkpoint = tmp_path_factory.mktemp("add") / "step10"
    before = real_loss(models, held_out)
    history = []
    for step in range(20):
        if step == 10:
            save_checkpoint(checkpoint, models, optimizers, CFG, step)
        history.append(train_step(models, optimizers, stream_batch(step), CFG, step))
    after = real_loss(models, held_out)
    return {"models": models, "history": history, "checkpoint": checkpoint, "before": before, "after": after}


def test_every_loss_stays_finite(run):
    for metrics in run["history"]:
        assert set(metrics) == {"d_loss", "d_real", "d_fake", "r1", "g_loss", "g_adv", "g_distill"}
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics


def test_discriminator_learns_the_real_data(run):
    assert run["after"] < run["before"] - 0.05, (run["before"], run["after"])
    first, last = run["history"][:5], run["history"][-5:]
    assert sum(m["d_real"] for m in last) < sum(m["d_real"] for m in first)


def test_student_moves_and_ema_trails(run):
    models = run["models"]
    student, teacher, ema = (dict(m.named_parameters()) for m in (models.student, models.teacher, models.ema))
    name = "conv_out.weight"
    assert not torch.equal(student[name], teacher[name])
    assert not torch.equal(ema[name], student[name])
    # the EMA has moved from the teacher towards the student, by far less than the student moved
    assert 0 < (ema[name] - teacher[name]).norm() < (student[name] - teacher[name]).norm()
    assert all(not p.requires_grad for p in models.teacher.parameters())
    assert all(not p.requires_grad for p in models.discriminator.feature_net.parameters())


def test_checkpoint_is_safetensors_and_json(run):
    files = sorted(p.name for p in run["checkpoint"].iterdir())
    assert files == [
        "discriminator_heads.safetensors",
        "optimizer_discriminator.safetensors",
        "optimizer_student.safetensors",
        "state.json",
        "student.safetensors",
        "student_ema.safetensors",
    ]
    state = json.loads((run["checkpoint"] / "state.json").read_text())
    assert state["step"] == 10 and state["config"]["distill_weight"] == 2.5


def test_resume_reproduces_the_next_step(run):
    models, optimizers = build()
    checkpoint = load_checkpoint(run["checkpoint"], models, optimizers)
    assert checkpoint.step == 10
    metrics = train_step(models, optimizers, stream_batch(10), CFG, 10)
    assert metrics == pytest.approx(run["history"][10], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    "cfg",
    [ADDConfig(weighting="nfsd", teacher_guidance_scale=7.5), ADDConfig(weighting="sds", teacher_guidance_scale=3.0)],
    ids=["nfsd", "sds-cfg"],
)
def test_teacher_variants_run(cfg):
    models, optimizers = build(cfg)
    data = ShapesStream(seed=1, size_px=SIZE_PX).batch(0, 2)
    metrics = train_step(models, optimizers, make_batch(data.captions, data.image, with_uncond=True), cfg, 0)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    batch = make_batch(data.captions, data.image)  # no unconditional / negative conditioning
    student = student_forward(models, batch, cfg, step_generator(0, 0, 0))
    with pytest.raises(ValueError, match="uncond"):
        teacher_latent_target(models, batch, student.latent, cfg, step_generator(0, 0, 0))


def test_config_checks():
    with pytest.raises(ValueError, match="999"):
        ADDConfig(student_timesteps=(0, 333, 666))
    with pytest.raises(ValueError, match="weighting"):
        ADDConfig(weighting="uniform")
    with pytest.raises(ValueError, match="not both 0"):
        ADDConfig(adversarial_weight=0.0, distill_weight=0.0)
    for bad, flag in (({"lr_student": -1.0}, "--add.lr-student"), ({"lr_discriminator": 0.0}, "--add.lr-discriminator"),
                      ({"grad_clip": -1.0}, "--add.grad-clip"), ({"ema_decay": 1.0}, "--add.ema-decay")):
        with pytest.raises(ValueError, match=flag):
            ADDConfig(**bad)
    with pytest.raises(ValueError, match="adversarial_weight"):
        ADDConfig(adversarial_weight=-1.0)


def _spy(module: torch.nn.Module) -> list[str]:
    """Records the class name of every forward run by `module` or any of its submodules."""
    calls = []
    for sub in module.modules():
        sub.register_forward_hook(lambda m, *_: calls.append(type(m).__name__))
    return calls


def test_adv_only_never_runs_the_teacher():
    cfg = ADDConfig(lr_student=1e-4, lr_discriminator=1e-3, seed=3, distill_weight=0.0)
    models, optimizers = build(cfg)
    teacher_calls = _spy(models.teacher)
    heads_before = [p.clone() for p in models.discriminator.heads.parameters()]
    metrics = train_step(models, optimizers, stream_batch(0), cfg, 0)
    assert teacher_calls == [] and metrics["g_distill"] == 0.0
    assert metrics["g_loss"] == pytest.approx(metrics["g_adv"])
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, models.discriminator.heads.parameters()))


def test_distill_only_never_runs_the_discriminator():
    cfg = ADDConfig(lr_student=1e-4, lr_discriminator=1e-3, seed=3, adversarial_weight=0.0)
    models, optimizers = build(cfg)
    disc_calls = _spy(models.discriminator)
    teacher_calls = _spy(models.teacher)
    heads_before = [p.clone() for p in models.discriminator.heads.parameters()]
    student_before = models.student.conv_out.weight.clone()
    metrics = train_step(models, optimizers, stream_batch(0), cfg, 0)
    assert disc_calls == [] and teacher_calls.count("UNet") == 1
    assert set(metrics) == {"g_loss", "g_adv", "g_distill"} and metrics["g_adv"] == 0.0
    assert metrics["g_loss"] == pytest.approx(2.5 * metrics["g_distill"]) and metrics["g_distill"] > 0
    assert all(torch.equal(a, b) for a, b in zip(heads_before, models.discriminator.heads.parameters()))
    assert not torch.equal(student_before, models.student.conv_out.weight)


def test_unet_conditioning_shapes():
    cond = unet_conditioning(*text_embeddings(["a red circle"]), SIZE_PX, TINY.unet)
    assert isinstance(cond, Conditioning)
    assert cond.context.shape == (1, 77, TINY.unet.context_dim) and cond.y.shape == (1, TINY.unet.adm_in_channels)
