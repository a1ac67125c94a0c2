"""Finding and loading model folders: local paths first, the hub only when allowed.

Weights load from safetensors only; a folder is checked (present, readable, valid headers)
before any model class sees it, so errors say which file is wrong and why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..errors import CorruptWeightsError, MissingModelError, ModelLoadError

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "**/*.json", "**/*.safetensors", "**/*.txt", "**/*.model"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_model_path(
    source: str | os.PathLike, *, local_files_only: bool | None = None, revision: str | None = None, what: str = "model"
) -> Path:
    """A local folder as it is, or a hub repo id downloaded (or found in the cache) as a folder.

    ``local_files_only`` defaults to ``HF_HUB_OFFLINE``; then only the local cache is consulted.
    """
    path = Path(source).expanduser()
    model_source = _registered_model(source)
    if model_source is not None:
        name, argument = model_source
        from ..registry import models

        return resolve_model_path(models.get(name)(argument), local_files_only=local_files_only, revision=revision, what=what)
    if path.exists():
        if not path.is_dir() and path.suffix != ".safetensors":
            raise MissingModelError(f"{what} {str(source)!r} is a file, expected a model folder")
        return path
    text = str(source)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and "\\" not in text
    if not looks_like_repo:
        raise MissingModelError(f"{what} folder {text!r} does not exist (and it is not a hub repo id of the form 'owner/name')")
    offline = hub_offline() if local_files_only is None else local_files_only
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except LocalEntryNotFoundError:
        how = "offline mode (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline else "the hub could not be reached"
        raise MissingModelError(
            f"{what} {text!r} is not a local folder and is not in the hub cache; {how}. "
            "Download it once with network access, or pass a local folder."
        ) from None
    except RepositoryNotFoundError:
        raise MissingModelError(f"{what} repository {text!r} was not found on the hub") from None
    except (HfHubHTTPError, OSError) as exc:
        raise MissingModelError(f"{what} {text!r} could not be fetched from the hub: {exc}") from None
    return Path(folder)


def _registered_model(source) -> tuple[str, str] | None:
    """``"name:argument"`` where ``name`` is a plugin's model source (not a path, not a drive letter)."""
    text = str(source)
    name, sep, argument = text.partition(":")
    if not sep or len(name) < 2 or "/" in name or "\\" in name or Path(text).exists():
        return None
    from ..registry import models

    return (name, argument) if name in models else None


def check_safetensors(file: Path) -> None:
    """Raise CorruptWeightsError unless ``file`` has a readable safetensors header."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except Exception as exc:
        raise CorruptWeightsError(f"weights file {str(file)!r} is not a valid safetensors file: {exc}") from None


def read_json(file: Path, *, what: str) -> dict[str, Any]:
    if not file.is_file():
        raise MissingModelError(f"{what}: {str(file)!r} is missing")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptWeightsError(f"{what}: {str(file)!r} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptWeightsError(f"{what}: {str(file)!r} should hold a JSON object, got {type(data).__name__}")
    return data


def check_component_folder(folder: Path, *, what: str, config_name: str = "config.json", weights: bool = True) -> None:
    """A model component folder: its config must parse and every safetensors file must open."""
    if not folder.is_dir():
        raise MissingModelError(f"{what}: folder {str(folder)!r} is missing")
    read_json(folder / config_name, what=what)
    if not weights:
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise MissingModelError(f"{what}: no .safetensors weights in {str(folder)!r} (found: {found}); only safetensors weights are loaded")
    for file in files:
        check_safetensors(file)


def load_component(cls, folder: Path, *, what: str, **kwargs: Any):
    """``cls.from_pretrained(folder)`` after checking the folder, with errors that name the component."""
    check_component_folder(folder, what=what)
    try:
        return cls.from_pretrained(folder, use_safetensors=True, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{what}: {cls.__name__} could not load {str(folder)!r}: {type(exc).__name__}: {exc}") from exc
