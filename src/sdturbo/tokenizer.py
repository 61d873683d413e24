"""CLIP byte-level BPE tokenizer, built on the `tokenizers` library from a vocab.json + merges.txt folder.

It rebuilds the pipeline of transformers 5.x `CLIPTokenizer` (what diffusers runs), so ids match it exactly:
  added tokens  matched first, on the raw text (or on the normalised text when their `normalized` flag is set);
                this is why sdxl-turbo's tokenizer_2, whose pad token "!" is a special added token, turns every "!"
                into its own id 0 ("!!" -> 0 0) while tokenizer 1 gives "!</w>" / "!!</w>" (diffusers #4153);
  normaliser    NFC, every whitespace run -> one space, lower case (no ftfy, no HTML unescaping);
  pre-tokeniser the CLIP regex (special-token strings, contractions, letter runs, single digits, other runs),
                then byte-level mapping;
  model         BPE with "</w>" appended to the last symbol of each word.
Output rows are [bos, up to model_max_length - 2 tokens, eos, pad...]."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

DEFAULT_BOS = "<|startoftext|>"
DEFAULT_EOS = "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77
SPECIAL_TOKEN_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_content(value: str | dict) -> str:
    """Special tokens are stored either as plain strings or as AddedToken dicts with a "content" field."""
    return value if isinstance(value, str) else value["content"]


def read_json_or_empty(path: Path) -> dict:
    """A tokenizer folder's optional JSON file; {} where it is absent."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def special_tokens(tokenizer_config: dict, special_tokens_map: dict) -> dict[str, str]:
    """bos/eos/unk/pad strings: tokenizer_config.json first, then special_tokens_map.json, then CLIP's defaults
    (unk and pad default to eos, as in transformers' CLIPTokenizer)."""
    defaults = {"bos_token": DEFAULT_BOS, "eos_token": DEFAULT_EOS}
    tokens = {}
    for role in SPECIAL_TOKEN_ROLES:
        value = tokenizer_config.get(role) or special_tokens_map.get(role) or defaults.get(role)
        tokens[role] = _token_content(value) if value else None
    tokens["unk_token"] = tokens["unk_token"] or tokens["eos_token"]
    tokens["pad_token"] = tokens["pad_token"] or tokens["eos_token"]
    return tokens


def _added_tokens(tokenizer_config: dict, special_tokens: dict[str, str]) -> list[AddedToken]:
    """The tokens matched before BPE, with their flags as saved in added_tokens_decoder; any bos/eos/unk/pad string
    not listed there is added as transformers does: special and un-normalised (matched on the raw text)."""
    added = [
        AddedToken(
            entry["content"],
            single_word=entry.get("single_word", False),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
            normalized=entry.get("normalized", False),
            special=True,  # special-ness does not change encoding; transformers marks these special anyway
        )
        for _, entry in sorted(tokenizer_config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
    ]
    listed = {token.content for token in added}
    for role in SPECIAL_TOKEN_ROLES:
        content = special_tokens[role]
        if content not in listed:
            added.append(AddedToken(content, normalized=False, special=True))
            listed.add(content)
    return added


def _vocab_and_merges(path: Path, tokenizer_config: dict) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """From vocab.json + merges.txt (the hub's sdxl-turbo folders), or else from the BPE model inside tokenizer.json
    (what transformers 5 saves). A tokenizer.json's added tokens are copied into tokenizer_config when it lists none."""
    if (path / "vocab.json").exists():
        vocab = read_json_or_empty(path / "vocab.json")
        lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return vocab, merges
    model = read_json_or_empty(path / "tokenizer.json").get("model", {})
    if model.get("type") != "BPE":
        raise FileNotFoundError(f"{path} has neither vocab.json + merges.txt nor a BPE tokenizer.json")
    if "added_tokens_decoder" not in tokenizer_config:
        added = read_json_or_empty(path / "tokenizer.json").get("added_tokens", [])
        tokenizer_config["added_tokens_decoder"] = {str(t["id"]): t for t in added}
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _clip_pipeline(bpe: BPE, bos_token: str, eos_token: str) -> Tokenizer:
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    # The special-token strings lead the regex so that a literal one the added-token pass missed (upper case, not
    # normalised) still stays one piece, as in CLIP and transformers.
    specials = f"{re.escape(bos_token)}|{re.escape(eos_token)}"
    clip_split = Regex(specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(clip_split, behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


class CLIPTokenizer:
    """Prompts -> fixed-length id rows for one CLIP text tower. The pad token is the only difference between
    sdxl-turbo's two tokenizers: "<|endoftext|>" (49407) for TE1, "!" (0) for TE2."""

    def __init__(self, tokenizer: Tokenizer, bos_token: str, eos_token: str, pad_token: str, model_max_length: int):
        self._tokenizer = tokenizer
        self.bos_token_id = self._token_id(bos_token)
        self.eos_token_id = self._token_id(eos_token)
        self.pad_token_id = self._token_id(pad_token)
        self.model_max_length = model_max_length

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Read vocab.json, merges.txt and (optional) tokenizer_config.json / special_tokens_map.json."""
        path = Path(path)
        tokenizer_config = read_json_or_empty(path / "tokenizer_config.json")
        special = special_tokens(tokenizer_config, read_json_or_empty(path / "special_tokens_map.json"))
        vocab, merges = _vocab_and_merges(path, tokenizer_config)
        bpe = BPE(vocab, merges, unk_token=special["unk_token"], continuing_subword_prefix="",
                  end_of_word_suffix="</w>", fuse_unk=False)
        tokenizer = _clip_pipeline(bpe, special["bos_token"], special["eos_token"])
        tokenizer.add_special_tokens(_added_tokens(tokenizer_config, special))
        # Files saved without a limit carry transformers' 1e30 sentinel; CLIP's context is 77.
        max_length = min(tokenizer_config.get("model_max_length", DEFAULT_MAX_LENGTH), DEFAULT_MAX_LENGTH)
        return cls(tokenizer, special["bos_token"], special["eos_token"], special["pad_token"], max_length)

    def _token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return token_id

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        """prompts -> LongTensor [B, model_max_length]; prompts longer than model_max_length - 2 tokens are cut,
        with a warning."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encodings = self._tokenizer.encode_batch(prompts, add_special_tokens=False)
        budget = self.model_max_length - 2
        for row, encoding in enumerate(encodings):
            if len(encoding.ids) > budget:
                warnings.warn(
                    f"prompt {row} is {len(encoding.ids)} tokens long; CLIP takes {budget}, so the last "
                    f"{len(encoding.ids) - budget} tokens were dropped",
                    stacklevel=2,
                )
        rows = [self._frame(encoding.ids[:budget]) for encoding in encodings]
        return torch.tensor(rows, dtype=torch.long).view(len(prompts), self.model_max_length)  # [B, 77]

    def _frame(self, token_ids: list[int]) -> list[int]:
        """bos + tokens + eos, padded to model_max_length."""
        framed = [self.bos_token_id, *token_ids, self.eos_token_id]
        return framed + [self.pad_token_id] * (self.model_max_length - len(framed))
