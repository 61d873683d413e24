"""Hugging Face Hub id -> local diffusers folder, through huggingface_hub's cache.

Only the files a diffusers-layout load needs are fetched (configs, tokenizers, one weights variant per component):
never the 6.9/13.9 GB sgm single files or the ONNX exports that sit in the same repository. huggingface_hub shows
the download progress bars and honours HF_HOME / HF_HUB_OFFLINE; offline, a cached snapshot is used as is."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from .diffusers_folder import TOKENIZER_FOLDERS, WEIGHT_NAMES, variant_order, with_variant
from .keymaps import COMPONENTS, LoadError

DEFAULT_REPO = "stabilityai/sdxl-turbo"
PASS_A_MODEL = "pass a local diffusers folder or a single .safetensors file"

CONFIG_FILES = ["model_index.json", "scheduler/scheduler_config.json"] + [f"{c}/config.json" for c in COMPONENTS]
TOKENIZER_PATTERNS = [f"{folder}/*" for folder in TOKENIZER_FOLDERS]


def weight_patterns(components: list[str], variant: str | None) -> list[str]:
    """The single weights file of each component in one variant (the Hub's SDXL pipelines are not sharded)."""
    return [f"{c}/{with_variant(WEIGHT_NAMES[c], variant)}" for c in components]


def _reason(error: Exception) -> str:
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    first_sentence = " ".join(str(error).split()).split(". ")[0]  # huggingface_hub's messages span lines
    return first_sentence or type(error).__name__


def download(repo_id: str, patterns: list[str], alternative: str) -> Path:
    """snapshot_download of the files matching `patterns`; a failure becomes a LoadError that gives the command to
    fetch them and the `alternative` to a download."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise LoadError(
            f"{repo_id} is not a model on the Hugging Face Hub you can read ({type(e).__name__}); "
            "check the id, or log in with `hf auth login` for a gated or private repository"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HFValidationError, OSError) as e:
        include = " ".join(f"'{p}'" for p in patterns)
        raise LoadError(
            f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and could not be downloaded "
            f"({_reason(e)}); fetch it on a connected machine with `hf download {repo_id} --include {include}` "
            f"(it fills that cache; with `--local-dir DIR` pass DIR instead), or {alternative}"
        ) from None


def _has_weights(folder: Path, component: str, variant: str | None) -> bool:
    return (folder / component / with_variant(WEIGHT_NAMES[component], variant)).is_file()


def resolve_hub_id(repo_id: str, variant: str | None = "fp16") -> Path:
    """Download (or find in the cache) what loading `repo_id` as a diffusers folder needs; returns the folder.

    Components without weights in `variant` get the other variant, as the folder loader will look for it."""
    preferred, fallback = variant_order(variant)
    common = CONFIG_FILES + TOKENIZER_PATTERNS
    try:
        folder = download(repo_id, common + weight_patterns(list(COMPONENTS), preferred), PASS_A_MODEL)
    except LoadError as first:
        try:  # offline, a cache holding only the other variant still loads
            return download(repo_id, common + weight_patterns(list(COMPONENTS), fallback), PASS_A_MODEL)
        except LoadError:
            raise first from None
    lacking = [c for c in COMPONENTS if not _has_weights(folder, c, preferred)]
    if lacking:
        folder = download(repo_id, weight_patterns(lacking, fallback), PASS_A_MODEL)
    return folder


def resolve_tokenizer_folder(repo_id: str = DEFAULT_REPO) -> Path:
    """The tokenizer/ and tokenizer_2/ files of a diffusers repository (a single file carries no tokenizer)."""
    alternative = "pass tokenizer= a folder holding tokenizer/ and tokenizer_2/ (or one vocab.json and merges.txt)"
    folder = download(repo_id, TOKENIZER_PATTERNS, alternative)
    for name in TOKENIZER_FOLDERS:
        # transformers >= 5 saves tokenizer.json alone; older versions vocab.json + merges.txt
        if not any((folder / name / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise LoadError(
                f"{repo_id} has no {name}/vocab.json or {name}/tokenizer.json (cached in {folder}); "
                "pass tokenizer= a folder"
            )
    return folder
