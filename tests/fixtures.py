"""Shared test helpers: CLIP tokenizer folders laid out like sdxl-turbo's tokenizer/ and tokenizer_2/.

The real vocabulary is rebuilt from the BPE merges file that the open_clip wheel ships, exactly as OpenAI CLIP
builds it, so tests need no network. open_clip is located, never imported (importing it pulls in timm, ftfy, ...)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path


def _find_clip_bpe_gz() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.exists() else None


CLIP_BPE_GZ: Path | None = _find_clip_bpe_gz()

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
NUM_CLIP_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges so the vocab is 49408


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table: printable Latin-1 bytes map to themselves, the rest to 256+n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def clip_vocab_and_merges(bpe_gz: Path, num_merges: int = NUM_CLIP_MERGES) -> tuple[dict[str, int], list[str]]:
    """The CLIP vocab (49408 entries with all 48,894 merges) and its merge lines, in OpenAI CLIP's order."""
    with gzip.open(bpe_gz) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : num_merges + 1]  # line 0 is the "#version" header
    byte_chars = list(bytes_to_unicode().values())
    merged = ["".join(merge.split()) for merge in merges]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + merged + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _added_token(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def tokenizer_config(pad_token: str, vocab: dict[str, int]) -> dict:
    """tokenizer_config.json as in sdxl-turbo: tokenizer_2/ additionally registers its pad token "!" (id 0) as a
    special, un-normalised added token, which is what makes transformers split every "!" into its own id 0."""
    added = {}
    if pad_token != EOS_TOKEN:
        added[str(vocab[pad_token])] = {**_added_token(pad_token, normalized=False), "special": True}
    added[str(vocab[BOS_TOKEN])] = {**_added_token(BOS_TOKEN, normalized=True), "special": True}
    added[str(vocab[EOS_TOKEN])] = {**_added_token(EOS_TOKEN, normalized=False), "special": True}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS_TOKEN,
    }


def special_tokens_map(pad_token: str) -> dict:
    return {
        "bos_token": _added_token(BOS_TOKEN, normalized=True),
        "eos_token": _added_token(EOS_TOKEN, normalized=False),
        "pad_token": pad_token if pad_token != EOS_TOKEN else _added_token(EOS_TOKEN, normalized=False),
        "unk_token": _added_token(EOS_TOKEN, normalized=False),
    }


def write_clip_tokenizer_folder(path: Path, pad_token: str, num_merges: int = NUM_CLIP_MERGES) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `path`; returns `path`.

    pad_token "<|endoftext|>" gives sdxl-turbo's tokenizer/, "!" gives tokenizer_2/. A smaller num_merges gives a
    small vocab in the same format whose special tokens have other ids (512 + num_merges and one more)."""
    if CLIP_BPE_GZ is None:
        raise FileNotFoundError("open_clip's bpe_simple_vocab_16e6.txt.gz is not installed")
    vocab, merges = clip_vocab_and_merges(CLIP_BPE_GZ, num_merges)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(pad_token, vocab), indent=2),
        "special_tokens_map.json": json.dumps(special_tokens_map(pad_token), indent=2),
    }
    for name, text in files.items():
        (path / name).write_text(text, encoding="utf-8")
    return path
