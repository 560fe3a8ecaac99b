"""Hugging Face Hub model ids (``gpt2``, ``meta-llama/Llama-3.2-1B``) as model directories.

A name that is not a local directory but reads like a Hub id is fetched with ``huggingface_hub``
into its cache (config, safetensors weights, tokenizer files only), which honours ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` from the environment; a cached model is
used as is when offline. The token is never printed.
"""

from __future__ import annotations

import re
from pathlib import Path

from common.errors import UserError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def looks_like_hub_id(path: str | Path) -> bool:
    """``org/name`` or ``name``: one slash at most, no leading dot or slash, and not a local path."""
    return not Path(path).exists() and HUB_ID.fullmatch(str(path)) is not None


def local_or_hub(path: str | Path) -> Path:
    """The directory ``path`` names: itself when it is local, else the cached snapshot of the Hub id it is."""
    return hub_snapshot(str(path)) if looks_like_hub_id(path) else Path(path)


def hub_snapshot(repo_id: str) -> Path:
    """The local directory of ``repo_id``'s files, from the cache or downloaded into it."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise UserError(f"{repo_id}: a gated Hugging Face model; accept its licence on the Hub and set HF_TOKEN") \
            from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id}: no such local directory, and no such model on the Hugging Face Hub "
                        "(a private one needs HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        raise UserError(f"{repo_id}: no such local directory, and not in the Hugging Face cache ({cache}) while "
                        "offline or without a connection; download it first (hf download "
                        f"{repo_id}) or pass a directory") from None
