"""Finding and loading model folders: local paths first, the hub only when allowed.

Weights load from safetensors only; a folder is checked (present, readable, valid headers)
before any model class sees it, so errors say which file is wrong and why. Loading is strict:
a config key the model class does not take, and a tensor the model needs that the weights lack,
are errors that name them (diffusers would warn, ignore the key and leave the tensor on the
meta device, to fail later as NaN). ``strict=False`` lets unknown config keys through with a
warning, for configs written by other diffusers versions; missing tensors stay an error.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..errors import CorruptWeightsError, InputTypeError, MissingModelError, MissingWeightsError, ModelLoadError, UnknownConfigKeyError

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "**/*.json", "**/*.safetensors", "**/*.txt", "**/*.model"]
# Weight variants (``name.fp16.safetensors``, sharded ``name.fp16-00001-of-00002.safetensors``, EMA
# copies): diffusers loads the plain file of a folder, so a variant beside it is never read.
HUB_IGNORE_PATTERNS = [f"*.{variant}{tail}" for variant in ("fp16", "bf16", "ema", "non_ema") for tail in (".safetensors", "-*.safetensors")]
COMPONENT_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")


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
    if not isinstance(source, (str, os.PathLike)):
        raise InputTypeError(f"{what}: expected a folder path, hub id or source:name, got {type(source).__name__} {source!r:.60}")
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
        patterns = _hub_allow_patterns(text, revision=revision, offline=offline)
        folder = snapshot_download(text, revision=revision, allow_patterns=patterns, ignore_patterns=HUB_IGNORE_PATTERNS,
                                   local_files_only=offline)  # fmt: skip
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


def _hub_allow_patterns(repo_id: str, *, revision: str | None, offline: bool) -> list[str]:
    """What to download of a hub repository: for a pipeline (``model_index.json`` at its root), the
    index and the folders of the components it lists, so single-file checkpoints kept at the root
    (SDXL's base repository holds two of about 7 GB) are left out; otherwise :data:`HUB_PATTERNS`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        index_file = hf_hub_download(repo_id, "model_index.json", revision=revision, local_files_only=offline)
        index = json.loads(Path(index_file).read_text())
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return HUB_PATTERNS  # not a pipeline repository, or not reachable: the download itself says why
    if not isinstance(index, dict):
        return HUB_PATTERNS
    components = sorted(
        name for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    )  # fmt: skip
    return ["model_index.json", *(f"{name}/{pattern}" for name in components for pattern in COMPONENT_FILE_PATTERNS)]


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


def unknown_config_keys(cls, config: dict[str, Any]) -> list[str]:
    """Keys of a diffusers ``config.json`` that the model class ``cls`` does not take as an argument
    (keys starting with ``_`` are metadata).

    Only diffusers models (``ConfigMixin``) are checked: transformers configs take any key by
    design, and real ones carry keys later versions dropped (Stable Diffusion 1.5's text encoder
    config has ``dropout``, which ``CLIPTextConfig`` no longer knows), so there a key proves nothing.
    """
    from diffusers.configuration_utils import ConfigMixin

    if not (isinstance(cls, type) and issubclass(cls, ConfigMixin)):
        return []
    known = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "_deprecated_kwargs", ()) or ())
    known -= {"self", "args", "kwargs"}
    return sorted(key for key in config if not key.startswith("_") and key not in known)


def check_config_keys(cls, folder: Path, *, what: str, strict: bool = True, config_name: str = "config.json") -> None:
    """Raise UnknownConfigKeyError naming the keys of ``folder/config.json`` that ``cls`` does not take
    (with ``strict=False``: warn and go on, as diffusers does)."""
    unknown = unknown_config_keys(cls, read_json(folder / config_name, what=what))
    if not unknown:
        return
    message = (f"{what}: {str(folder / config_name)!r} has keys that {cls.__name__} does not take: {', '.join(unknown)}; "
               "expected only its arguments (a typo, or a config from another diffusers/transformers version)")
    if strict:
        raise UnknownConfigKeyError(message + "; pass strict=False to ignore them")
    warnings.warn(message + "; ignored (strict=False)", stacklevel=3)


def load_component(cls, folder: Path, *, what: str, strict: bool = True, **kwargs: Any):
    """``cls.from_pretrained(folder)`` after checking the folder, with errors that name the component.

    Unknown config keys raise :class:`UnknownConfigKeyError` (a warning with ``strict=False``);
    tensors the model needs that the weights lack always raise :class:`MissingWeightsError`.
    """
    check_component_folder(folder, what=what)
    check_config_keys(cls, folder, what=what, strict=strict)
    try:
        model, info = cls.from_pretrained(folder, use_safetensors=True, output_loading_info=True, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{what}: {cls.__name__} could not load {str(folder)!r}: {type(exc).__name__}: {exc}") from exc
    missing = sorted(map(str, info.get("missing_keys") or ()))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingWeightsError(
            f"{what}: the weights in {str(folder)!r} lack {len(missing)} tensor(s) that {cls.__name__} needs: {shown}; "
            "expected a complete checkpoint for this config"
        )
    return model
