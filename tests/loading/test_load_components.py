"""load_components end to end on tiny random checkpoints: both layouts, dtypes, variants, strictness, tokenizers."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdturbo.loading import Components, LoadError, load_components, save_diffusers_folder, save_single_file
from sdturbo.loading.keymaps import COMPONENTS
from sdturbo.models.configs import TINY
from sdturbo.pipeline import TurboPipeline


def assert_weights_equal(components: Components, state_dicts, dtype=torch.float32):
    for name in COMPONENTS:
        loaded = components.models()[name].state_dict()
        assert loaded.keys() == state_dicts[name].keys(), name
        assert all(torch.equal(loaded[k], t.to(dtype)) for k, t in state_dicts[name].items()), name


@pytest.fixture(scope="module")
def loaded(tiny_folder, tiny_single_file) -> tuple[Components, Components]:
    """(from the diffusers folder, from the single file), both fp32."""
    return load_components(tiny_folder), load_components(tiny_single_file, tokenizer=tiny_folder)


def test_single_file_and_folder_load_bit_identical(loaded, tiny_single_file, tiny_state_dicts):
    from_folder, from_file = loaded
    for components in loaded:
        assert components.spec == TINY
        assert_weights_equal(components, tiny_state_dicts)
        models = components.models().values()
        assert not any(m.training for m in models)
        # nothing left on the meta device (a non-persistent buffer would be: it is in no checkpoint)
        assert not any(t.is_meta for m in models for t in [*m.parameters(), *m.buffers()])
    assert from_file.name == str(tiny_single_file)
    assert from_folder.tokenizer("a cat").tolist() == from_file.tokenizer("a cat").tolist()


def test_loaded_model_runs(loaded):
    c = loaded[0]
    h, pooled = c.text_encoder_2(c.tokenizer_2(["a photo of a cat"]))
    assert h.shape == (1, 77, TINY.text_encoder_2.hidden_size) and pooled.shape == (1, 128)


def test_bf16_load_casts_every_tensor(tiny_single_file, tiny_folder, tiny_state_dicts):
    c = load_components(tiny_single_file, dtype=torch.bfloat16, tokenizer=tiny_folder)
    assert {t.dtype for m in c.models().values() for t in m.state_dict().values()} == {torch.bfloat16}
    assert_weights_equal(c, tiny_state_dicts, torch.bfloat16)


def test_fp16_variant_is_preferred_and_plain_is_the_fallback(tiny_folder, tmp_path, tiny_state_dicts):
    folder = shutil.copytree(tiny_folder, tmp_path / "both")
    half = {name: {k: t.half() for k, t in sd.items()} for name, sd in tiny_state_dicts.items()}
    save_diffusers_folder(folder, half, TINY, variant="fp16")
    # dtype=None keeps each file's dtype, which tells which file was read
    assert load_components(folder, dtype=None).unet.conv_in.weight.dtype == torch.float16
    assert load_components(folder, dtype=None, variant=None).unet.conv_in.weight.dtype == torch.float32


def _rewrite(path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_strict_errors_name_every_bad_key(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "bad")

    def break_unet(t):
        del t["conv_in.bias"]
        t["down_blocks.0.resnets.0.extra.weight"] = torch.zeros(1)
        t["conv_out.weight"] = torch.zeros(3, 64, 3, 3)

    _rewrite(folder / "unet" / "diffusion_pytorch_model.safetensors", break_unet)
    _rewrite(folder / "vae" / "diffusion_pytorch_model.safetensors", lambda t: t.pop("decoder.conv_out.bias"))
    with pytest.raises(LoadError) as e:
        load_components(folder)
    message = str(e.value)
    assert "\n" not in message
    assert "2 missing [unet.conv_in.bias, vae.decoder.conv_out.bias]" in message
    assert "1 unexpected [unet.down_blocks.0.resnets.0.extra.weight]" in message
    assert "1 mis-shaped [unet.conv_out.weight [3, 64, 3, 3] (model: [4, 64, 3, 3])]" in message


def test_error_lists_at_most_ten_names_and_counts_the_rest(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "few")
    _rewrite(folder / "text_encoder" / "model.safetensors", lambda t: [t.pop(k) for k in list(t)[:15]])
    with pytest.raises(LoadError, match=r"15 missing \[(text_encoder\.[^,\]]+, ){9}text_encoder\.[^,\]]+ and 5 more\]"):
        load_components(folder)


def test_single_file_strictness_reports_unmapped_and_ignores_harmless_buffers(tmp_path, tiny_state_dicts, tiny_folder):
    path = save_single_file(tmp_path / "x.safetensors", tiny_state_dicts, TINY)
    harmless = {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77.0)[None],
        "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6),
        "denoiser.sigmas": torch.linspace(0.03, 14.6, 1000),
        # sgm training checkpoints' EMA copy and a TE1 saved with its (unused) projection, as diffusers ignores them
        "model_ema.decay": torch.tensor(0.999),
        "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(3),
        "conditioner.embedders.0.transformer.text_projection.weight": torch.zeros(8, 8),
    }
    _rewrite(path, lambda t: t.update(harmless))
    assert_weights_equal(load_components(path, tokenizer=tiny_folder), tiny_state_dicts)

    def add_stray(t):
        t["cond_stage_model.decay"] = torch.tensor(0.999)
        del t["first_stage_model.encoder.mid.attn_1.k.bias"]

    _rewrite(path, add_stray)
    expected = r"1 missing \[vae.encoder.mid_block.attentions.0.to_k.bias\]; 1 unexpected \[cond_stage_model.decay\]"
    with pytest.raises(LoadError, match=expected):
        load_components(path, tokenizer=tiny_folder)


def test_bad_sources(tmp_path, tiny_single_file, tiny_folder):
    with pytest.raises(LoadError, match="weights file .*missing.safetensors does not exist"):
        load_components(tmp_path / "missing.safetensors", tokenizer=tiny_folder)
    ckpt = tmp_path / "sd_xl_turbo_1.0.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(LoadError, match=r"sd_xl_turbo_1.0.ckpt is a pickle file, .*convert it to safetensors once"):
        load_components(ckpt, tokenizer=tiny_folder)
    with pytest.raises(LoadError, match="is neither a folder, a .safetensors file nor a Hugging Face model id"):
        load_components(tmp_path / "no" / "such" / "model")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_single_file.read_bytes()[:-100])
    with pytest.raises(LoadError, match=r"truncated.safetensors is corrupt or truncated \(.*\); re-download it"):
        load_components(truncated, tokenizer=tiny_folder)


def test_one_vocab_folder_serves_both_towers_with_their_pad_ids(tiny_single_file, tokenizer_folders):
    tokenizer_2_folder = tokenizer_folders[1]  # its own config pads with "!": TE1 must still pad with eos
    c = load_components(tiny_single_file, tokenizer=tokenizer_2_folder)
    assert c.tokenizer("a")[0, -1].item() == 49407
    assert c.tokenizer_2("a")[0, -1].item() == 0


def test_tokenizer_folder_without_vocab_is_named(tiny_single_file, tmp_path):
    with pytest.raises(LoadError, match=r"has no vocab.json \+ merges.txt or tokenizer.json"):
        load_components(tiny_single_file, tokenizer=tmp_path)


def test_models_are_built_on_meta_and_adopt_the_read_tensors(tiny_single_file, tiny_folder, monkeypatch):
    """assign=True: the parameters are the tensors read from the file, not copies into freshly allocated ones."""
    import sdturbo.loading as loading

    read = {}
    original = loading.read_tensors

    def spy(*args, **kwargs):
        read.update(original(*args, **kwargs))
        return read

    monkeypatch.setattr(loading, "read_tensors", spy)
    c = load_components(tiny_single_file, dtype=torch.float16, tokenizer=tiny_folder)
    weight = read["model.diffusion_model.input_blocks.0.0.weight"]
    assert c.unet.conv_in.weight.data_ptr() == weight.data_ptr()



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["folder", "single file"])
def test_loads_straight_to_cuda(layout, tiny_folder, tiny_single_file, tiny_state_dicts):
    source = tiny_folder if layout == "folder" else tiny_single_file
    c = load_components(source, device="cuda", dtype=torch.float16, tokenizer=tiny_folder)
    tensors = [t for m in c.models().values() for t in m.state_dict().values()]
    assert {(t.device.type, t.dtype) for t in tensors} == {("cuda", torch.float16)}
    expected = tiny_state_dicts["unet"]["conv_in.weight"].half()
    assert torch.equal(c.unet.conv_in.weight.cpu(), expected)
    with torch.no_grad():
        h, pooled = c.text_encoder_2(c.tokenizer_2(["a cat"]).cuda())
    assert pooled.shape == (1, 128) and torch.isfinite(h).all()


def test_integer_weights_are_refused_with_file_key_and_dtype(tiny_folder, tmp_path):
    folder = shutil.copytree(tiny_folder, tmp_path / "ints")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    _rewrite(path, lambda t: t.update({"conv_in.weight": t["conv_in.weight"].to(torch.int32)}))
    with pytest.raises(LoadError) as e:
        load_components(folder)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: tensor conv_in.weight is torch.int32, but every weight sdturbo loads is float")


def test_eos_id_of_the_text_config_should_be_the_tokenizers(tiny_folder, tmp_path):
    """transformers pools at the config's eos_token_id, sdturbo at the tokenizer's: a mismatch is another image in
    diffusers, so the load warns (sdturbo's own images are right)."""
    folder = shutil.copytree(tiny_folder, tmp_path / "eos")
    config_path = folder / "text_encoder_2" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "eos_token_id": 2}))  # the official files' legacy id: argmax(ids)
    load_components(folder)
    config_path.write_text(json.dumps({**config, "eos_token_id": 602}))
    with pytest.warns(UserWarning, match=r"text_encoder_2/config.json: eos_token_id 602 is not the tokenizer's end "
                                         r"token 49407: .*; set \"eos_token_id\": 49407 in the file"):
        load_components(folder)


@pytest.mark.parametrize("device", ["mps", "meta", "xpu:0"])
def test_devices_sdturbo_does_not_run_on_are_refused_at_load(tiny_folder, device):
    with pytest.raises(ValueError, match=rf"device '{device}' is not supported: sdturbo runs on cpu or cuda\[:N\]; "
                                         r"use device='cpu' \(Python\) / --device cpu \(command line\)"):
        load_components(tiny_folder, device=device)
    with pytest.raises(ValueError, match=f"device '{device}' is not supported"):
        TurboPipeline.from_pretrained(tiny_folder, device=device)


def test_cuda_without_a_gpu_says_how_to_pick_the_cpu_from_python_and_the_command_line(tiny_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"no CUDA GPU is available; use device='cpu' \(Python\) / --device cpu"):
        load_components(tiny_folder, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device 'cuda:1' was asked for but this machine has 1 CUDA GPU\(s\)"):
        load_components(tiny_folder, device="cuda:1")


def test_vae_attention_stored_as_linear_loads(tmp_path, tiny_state_dicts, tiny_folder):
    """Some converters keep a diffusers VAE's [C, C] attention weights in sgm files (diffusers loads them too)."""
    path = save_single_file(tmp_path / "x.safetensors", tiny_state_dicts, TINY)

    def squeeze(t):
        for key in [k for k in t if ".mid.attn_1." in k and k.endswith(".weight") and t[k].dim() == 4]:
            t[key] = t[key][:, :, 0, 0].contiguous()

    _rewrite(path, squeeze)
    assert_weights_equal(load_components(path, tokenizer=tiny_folder), tiny_state_dicts)


def test_inpainting_unet_is_refused_at_load(tmp_path, tiny_state_dicts, tiny_folder):
    """A 9-channel (inpainting) UNet loaded before and failed at the first image."""
    path = save_single_file(tmp_path / "x.safetensors", tiny_state_dicts, TINY)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    _rewrite(path, lambda t: t.update({key: torch.cat([t[key], torch.zeros_like(t[key])[:, :1].repeat(1, 5, 1, 1)], 1)}))
    refused = r"the UNet takes 9 and predicts 4 channels, the VAE's latents have 4: not a text-to-image SDXL UNet"
    with pytest.raises(LoadError, match=refused):
        load_components(path, tokenizer=tiny_folder)
    folder = shutil.copytree(tiny_folder, tmp_path / "inpaint")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    with pytest.raises(LoadError, match=refused):
        load_components(folder)


def test_cross_attention_width_must_fit_the_text_encoders(tmp_path, tiny_folder):
    folder = shutil.copytree(tiny_folder, tmp_path / "odd")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 64}))
    with pytest.raises(LoadError, match=r"cross-attention width 64 is not the text encoders' \d+ \+ \d+"):
        load_components(folder)


def test_pickles_are_named_whatever_their_file_name(tmp_path, tiny_single_file, tiny_folder):
    renamed = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(1)}, renamed)  # never loaded: the test only writes it
    with pytest.raises(LoadError, match="model.safetensors is a pickle file"):
        load_components(renamed, tokenizer=tiny_folder)
    with pytest.raises(LoadError, match="MODEL.CKPT is a pickle file"):
        load_components(tmp_path / "MODEL.CKPT", tokenizer=tiny_folder)
    upper = shutil.copy(tiny_single_file, tmp_path / "X.SAFETENSORS")
    assert load_components(upper, tokenizer=tiny_folder).spec == TINY


def test_pickle_hint_converts_to_the_name_the_loader_reads(tmp_path, tiny_folder):
    folder = shutil.copytree(tiny_folder, tmp_path / "bin")
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LoadError, match=r"s.save_file\(sd.get\('state_dict', sd\), '.*text_encoder/model.safetensors'\)"):
        load_components(folder)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_weights_get_the_mode_of_the_users_umask(tmp_path, tiny_state_dicts, umask, mode):
    """safetensors writes a 0600 temporary file and renames it: the weights would stay private whatever the umask."""
    old = os.umask(umask)
    try:
        single = save_single_file(tmp_path / "x.safetensors", tiny_state_dicts, TINY)
        folder = save_diffusers_folder(tmp_path / "folder", tiny_state_dicts, TINY)
    finally:
        os.umask(old)
    weights = [single, *folder.rglob("*.safetensors")]
    assert len(weights) == 5 and {p.stat().st_mode & 0o777 for p in weights} == {mode}
