"""Train sdturbo-mini's byte-level BPE on the training captions and write it in CLIP's folder format.

The vocabulary is laid out exactly as OpenAI CLIP lays out its own: the 256 byte symbols, the same 256 with the
word-final "</w>", one token per merge in merge order, then <|startoftext|> and <|endoftext|> last, so eos has the
largest id (CLIPTextModel pools at the first eos). Any text still tokenizes: every byte has a symbol."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from ...tokenizer import DEFAULT_BOS, DEFAULT_EOS, CLIPTokenizer, _clip_pipeline
from .cache import caption_stream

END_OF_WORD = "</w>"
TOKENIZER_SEED = 1234  # captions of their own, drawn from the same scene and caption distribution as the images


def train_merges(captions: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """BPE merges learnt with CLIP's normaliser and pre-tokeniser, most frequent first."""
    model = BPE(end_of_word_suffix=END_OF_WORD)
    tokenizer = _clip_pipeline(model, DEFAULT_BOS, DEFAULT_EOS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(
        # The trainer's vocab = alphabet (+ word-final symbols it saw) + merges; ask for enough room for all merges.
        vocab_size=2 * len(alphabet) + num_merges,
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return pairs[:num_merges]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: bytes, bytes + "</w>", merges, bos, eos."""
    symbols = list(_byte_symbols())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [DEFAULT_BOS, DEFAULT_EOS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte -> printable-character table, in CLIP's order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(extra))]


def write_tokenizer_folder(path: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> Path:
    """vocab.json, merges.txt, tokenizer_config.json as in sdxl-turbo's tokenizer/ (pad = eos) and tokenizer_2/
    (pad = "!")."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": DEFAULT_BOS,
        "eos_token": DEFAULT_EOS,
        "unk_token": DEFAULT_EOS,
        "pad_token": pad_token,
        "model_max_length": 77,
        "do_lower_case": True,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def train_tokenizers(out_dir: Path, vocab_size: int, num_captions: int) -> tuple[Path, Path]:
    """-> (tokenizer/, tokenizer_2/) under out_dir; same vocabulary and merges, different pad tokens."""
    num_merges = vocab_size - 2 * 256 - 2
    merges = train_merges(caption_stream(TOKENIZER_SEED, num_captions), num_merges)
    vocab = clip_vocab(merges)
    if len(vocab) > vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} tokens, more than the configured {vocab_size}")
    folders = (
        write_tokenizer_folder(out_dir / "tokenizer", vocab, merges, pad_token=DEFAULT_EOS),
        write_tokenizer_folder(out_dir / "tokenizer_2", vocab, merges, pad_token="!"),
    )
    for folder in folders:
        CLIPTokenizer.from_folder(folder)  # fail here, not at export, if the files do not load
    return folders
