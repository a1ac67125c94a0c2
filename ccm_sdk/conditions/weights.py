"""Loading the networks behind model-backed conditions, with typed errors.

A weights source is a file, a local folder, or a Hugging Face hub repo id. Hub downloads honour
``HF_HUB_OFFLINE`` and ``local_files_only`` (then only the local hub cache is read). When the hub
cannot be reached (no network: a short connection probe fails), only the cache is read too, so a
missing download fails at once with a hint instead of after huggingface_hub's retries.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
from collections.abc import Collection, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptWeightsError, IncompatibleModelsError, MissingModelError
from ..models.loading import hub_offline


PROBE_SECONDS = 3.0  # how long the hub's address may take to resolve and accept a connection


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether the hub's host resolves and accepts a TCP connection within ``timeout`` seconds (asked once per process).

    The probe runs in a thread so that a hanging name look-up cannot hold the caller longer.
    """
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    reached = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.set()
        except OSError:
            pass

    threading.Thread(target=probe, daemon=True, name="ccm-hub-probe").start()
    return reached.wait(timeout)


def offline(local_files_only: bool = False) -> bool:
    """Whether hub look-ups must stay in the local cache: asked to, HF_HUB_OFFLINE set, or the hub unreachable."""
    return local_files_only or hub_offline() or not hub_reachable()


def in_hub_cache(repo: str) -> bool:
    """Whether the local hub cache holds a snapshot of ``repo`` (read from disk only; says nothing of its files)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(any(snapshot.iterdir()) for snapshot in snapshots.iterdir() if snapshot.is_dir())


def download_hint(repo: str, filenames: Sequence[str] = (), *, option: str = "model") -> str:
    """How to get ``repo``'s weights onto this machine, for an error message."""
    files = f" {filenames[-1]}" if filenames else ""
    return (f"download it once with network access (`hf download {repo}{files}`, or any call with the network up), "
            f"then it is read from the hub cache offline; or pass a local copy with the condition option {option}=PATH")


def is_local_path(source: str | os.PathLike) -> bool:
    """A path that exists, or that is spelled like one (absolute, ./, ~, or deeper than org/name)."""
    text = os.fspath(source)
    if Path(text).expanduser().exists():
        return True
    return os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or os.sep in text.replace("/", "")


def resolve_weights_file(
    source: str | os.PathLike, filenames: Sequence[str], *, local_files_only: bool = False, what: str = "weights"
) -> Path:
    """A weights file from a file path, a folder holding one of ``filenames``, or a hub repo holding one."""
    path = Path(os.fspath(source)).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in filenames:
            if (path / name).is_file():
                return path / name
        raise MissingModelError(f"{what}: folder {path} holds none of {list(filenames)}")
    if is_local_path(source):
        raise MissingModelError(f"{what}: {path} does not exist")
    from huggingface_hub import hf_hub_download

    failures = []
    for name in filenames:
        try:
            return Path(hf_hub_download(os.fspath(source), name, local_files_only=offline(local_files_only)))
        except Exception as exc:  # hub errors differ across huggingface_hub versions; all mean "not here"
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    hint = f"To fix: {download_hint(os.fspath(source), filenames)}"
    if offline(local_files_only):  # the hub's own message says only that the file is not cached
        raise MissingModelError(f"{what}: {source!r} is not a local file or folder, and hub repo {source!r} "
                                f"(offline: local cache only) has none of {list(filenames)} in the local cache. {hint}")
    raise MissingModelError(
        f"{what}: {source!r} is not a local file or folder, and hub repo {source!r} gave none of "
        f"{list(filenames)}: " + "; ".join(failures) + f". {hint}"
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a torch state dict with ``weights_only=True``, onto the CPU."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise MissingModelError(f"weights file {path} does not exist") from exc
    except Exception as exc:  # UnpicklingError, SafetensorError, EOFError, RuntimeError: all mean unreadable
        raise CorruptWeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    # Training checkpoints often wrap the weights; unwrap the common single-level layouts.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptWeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def _check_model_type(source: str, model_types: Collection[str], local_files_only: bool, what: str) -> None:
    config_path = resolve_weights_file(source, ("config.json",), local_files_only=local_files_only, what=what)
    try:
        model_type = json.loads(Path(config_path).read_text()).get("model_type")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptWeightsError(f"{what}: {config_path} is not valid JSON: {exc}") from exc
    if model_type not in model_types:
        raise IncompatibleModelsError(
            f"{what}: {source} is a {model_type!r} model, expected one of {sorted(model_types)}"
        )


@contextmanager
def _quiet_transformers():
    # transformers logs a per-key load report and a progress bar; the result is checked below instead.
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_transformers_model(
    auto_cls: Any,
    source: str | os.PathLike,
    *,
    local_files_only: bool = False,
    what: str,
    model_types: Collection[str] | None = None,
):
    """``auto_cls.from_pretrained(source)`` in eval mode; a model with missing or extra weights is an error.

    ``model_types`` restricts the config's ``model_type`` (for concrete classes, which would
    otherwise try to load any config).
    """
    text = os.fspath(source)
    if not is_local_path(text) and offline(local_files_only):
        # from_pretrained still sends some requests (adapter_config.json) when local_files_only
        # is set; resolving the cached snapshot first keeps offline loads off the network.
        from huggingface_hub import snapshot_download

        try:
            text = snapshot_download(text, local_files_only=True)
        except Exception as exc:
            raise MissingModelError(
                f"{what}: {source!r} is not a local folder and hub repo {source!r} is not in the local cache "
                f"(offline: local cache only). To fix: {download_hint(text)}"
            ) from exc
    path = Path(text).expanduser()
    if is_local_path(text):
        if not path.is_dir():
            raise MissingModelError(f"{what}: model folder {path} does not exist")
        if not (path / "config.json").is_file():
            raise MissingModelError(
                f"{what}: {path} has no config.json (expected a transformers save_pretrained folder)"
            )
        text = str(path)
    if model_types is not None:
        _check_model_type(text, model_types, local_files_only, what)
    try:
        with _quiet_transformers():
            model, info = auto_cls.from_pretrained(
                text, local_files_only=is_local_path(text) or offline(local_files_only), output_loading_info=True
            )
    except ValueError as exc:
        if "Unrecognized" in str(exc) or "configuration class" in str(exc):
            raise IncompatibleModelsError(f"{what}: {text} is not a model of the accepted kind: {exc}") from exc
        raise CorruptWeightsError(f"{what}: cannot load {text}: {exc}") from exc
    except OSError as exc:
        # For a folder that exists with a config, an OSError other than "no such file" is a bad file.
        missing_file = any(m in str(exc) for m in ("does not appear to have", "no file named"))
        if is_local_path(text) and not missing_file:
            raise CorruptWeightsError(f"{what}: cannot read the weights in {text}: {exc}") from exc
        raise MissingModelError(f"{what}: cannot find {text}: {exc}") from exc
    except Exception as exc:  # safetensors' SafetensorError, unpickling errors, truncated files
        raise CorruptWeightsError(f"{what}: cannot read the weights in {text}: {type(exc).__name__}: {exc}") from exc
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        summary = "; ".join(f"{k}: {len(v)} (e.g. {sorted(map(str, v))[:3]})" for k, v in problems.items())
        raise IncompatibleModelsError(f"{what}: the weights in {text} do not fit its config ({summary})")
    return model.eval()
