"""CLIP tokenizer: ids equal transformers' CLIPTokenizer (what diffusers runs) on both sdxl-turbo tokenizer folders."""

from __future__ import annotations

import warnings

import pytest
import torch

from fixtures import CLIP_BPE_GZ, EOS_TOKEN, write_clip_tokenizer_folder
from sdturbo.tokenizer import CLIPTokenizer

pytestmark = pytest.mark.skipif(CLIP_BPE_GZ is None, reason="open_clip's CLIP BPE merges file is not installed")

HARD_PROMPTS = [
    "a photo of a cat",
    "Hello! World!! a!b !!! ?!",
    "",
    "   leading and trailing   ",
    "multiple   spaces\n\nnewlines\tand\ttabs",
    "UPPER CASE and MiXeD",
    "digits 1234567 and 3.14 and 1,000",
    "contractions: don't it's we'll I'M they're you've I'd",
    "html &amp; &lt;b&gt; entities",
    "accents: café naïve Ünïcödé résumé e\u0301",
    "CJK 日本語の文章 中文 한국어",
    "emoji 😀🎉 👍🏽 and symbols ©®™ — “quotes”",
    "literal <|endoftext|> and <|startoftext|> and <|ENDOFTEXT|>",
    "word " * 80,
    "!" * 90,
    "a " * 75,  # exactly 75 tokens: fills the row with no padding and no truncation
]


def reference_ids(folder, prompts: list[str]) -> torch.Tensor:
    """diffusers' encode_prompt call."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def tokenize_quietly(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(prompts)


@pytest.mark.parity
@pytest.mark.parametrize("which", [0, 1], ids=["tokenizer", "tokenizer_2"])
def test_matches_transformers_on_hard_prompts(tokenizer_folders, which):
    folder = tokenizer_folders[which]
    ids = tokenize_quietly(CLIPTokenizer.from_folder(folder), HARD_PROMPTS)
    expected = reference_ids(folder, HARD_PROMPTS)
    for prompt, row, expected_row in zip(HARD_PROMPTS, ids, expected):
        assert row.tolist() == expected_row.tolist(), prompt


@pytest.mark.parity
def test_small_custom_vocab_matches_transformers(tmp_path):
    """A vocab trained later on synthetic captions has the same layout but other special-token ids."""
    folder = write_clip_tokenizer_folder(tmp_path / "small", pad_token="!", num_merges=1000)
    tokenizer = CLIPTokenizer.from_folder(folder)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1512, 1513, 0)
    expected = reference_ids(folder, HARD_PROMPTS)
    assert torch.equal(tokenize_quietly(tokenizer, HARD_PROMPTS), expected)


def test_special_ids_and_layout(tokenizer_folders):
    tok1, tok2 = (CLIPTokenizer.from_folder(folder) for folder in tokenizer_folders)
    assert (tok1.bos_token_id, tok1.eos_token_id, tok1.pad_token_id, tok1.model_max_length) == (49406, 49407, 49407, 77)
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id, tok2.model_max_length) == (49406, 49407, 0, 77)
    ids = tok2(["a photo of a cat", ""])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and (ids[0, 7:] == 0).all()
    assert ids[1, :2].tolist() == [49406, 49407] and (ids[1, 2:] == 0).all()
    assert torch.equal(tok1("a photo of a cat"), tok1(["a photo of a cat"]))
    assert tok1([]).shape == (0, 77)


def test_exclamation_marks_split_only_in_tokenizer_2(tokenizer_folders):
    """tokenizer_2 registers its pad token "!" as an added token, so transformers (and diffusers) give every "!" its
    own id 0; tokenizer 1 and open_clip merge runs of "!" ("!</w>" 256, "!!</w>" 748)."""
    tok1, tok2 = (CLIPTokenizer.from_folder(folder) for folder in tokenizer_folders)
    assert tok1("! !! a!b")[0, :7].tolist() == [49406, 256, 748, 320, 256, 321, 49407]
    assert tok2("! !! a!b")[0, :8].tolist() == [49406, 0, 0, 0, 320, 0, 321, 49407]


def test_truncation_keeps_75_tokens_and_warns(tokenizer_folders):
    tokenizer = CLIPTokenizer.from_folder(tokenizer_folders[1])
    with pytest.warns(UserWarning, match="the last 5 tokens were dropped"):
        ids = tokenizer(["word " * 80])
    assert ids[0, 0] == 49406 and (ids[0, 1:76] == tokenizer(["word"])[0, 1]).all() and ids[0, 76] == 49407
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = tokenizer(["a " * 75])
    assert full[0, 76] == 49407 and (full[0, 1:76] == 320).all()


def test_missing_configs_fall_back_to_clip_defaults(tmp_path):
    """Without tokenizer_config.json / special_tokens_map.json: CLIP's special tokens, padding with eos."""
    folder = write_clip_tokenizer_folder(tmp_path / "bare", pad_token=EOS_TOKEN, num_merges=1000)
    (folder / "tokenizer_config.json").unlink()
    (folder / "special_tokens_map.json").unlink()
    tokenizer = CLIPTokenizer.from_folder(folder)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1512, 1513, 1513)
    assert tokenizer.model_max_length == 77


@pytest.mark.parity
def test_folder_saved_by_transformers_5_with_only_tokenizer_json(tokenizer_folders, tmp_path):
    """transformers 5 saves tokenizer.json instead of vocab.json + merges.txt; both load to the same ids."""
    transformers = pytest.importorskip("transformers")
    for folder in tokenizer_folders:
        saved = tmp_path / folder.name
        transformers.CLIPTokenizer.from_pretrained(folder).save_pretrained(saved)
        assert not (saved / "vocab.json").exists() and (saved / "tokenizer.json").exists()
        prompts = ["a red circle!! left of a blue square", "", "Hello, WORLD! 123 &amp; café"]
        assert torch.equal(CLIPTokenizer.from_folder(saved)(prompts), CLIPTokenizer.from_folder(folder)(prompts))
