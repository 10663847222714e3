"""Uploads to the Hugging Face Hub (``--push-to-hub``): the token, and one folder in one commit."""
from __future__ import annotations

import os
from pathlib import Path

from cycleqd.config import ConfigError


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ConfigError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def push_folder(folder: Path, repo_id: str, *, private: bool, token: str, message: str) -> str:
    """Create (or reuse) the Hub model repo ``repo_id`` and upload ``folder`` in one commit; returns its URL.

    Honours HF_ENDPOINT as set now (not only when huggingface_hub was imported).
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message)
    return str(url)
