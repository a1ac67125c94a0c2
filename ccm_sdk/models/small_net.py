"""Small measuring networks (a domain's FID features, a depth estimator): their folder format and their training loop.

A folder holds ``config.json`` (the pydantic config) and ``model.safetensors``. Training fits
the network on ``(input, target)`` pairs from the first ``train_size`` items of a dataset, with
seeded random batches drawn with replacement, AdamW and a cosine learning-rate decay.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CorruptWeightsError, InputError, MissingModelError, TrainingError

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"

Net = TypeVar("Net", bound=torch.nn.Module)


def save_net(net: torch.nn.Module, config: BaseModel, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    return folder


def load_net(build: Callable[[Any], Net], config_class: type[BaseModel], folder: str | os.PathLike, *, what: str) -> Net:
    """``build(config)`` with the folder's weights, in eval mode; typed errors for missing or unreadable folders."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise MissingModelError(f"expected a {what} folder with {CONFIG_NAME} and {WEIGHTS_NAME} at {str(folder)!r}")
    try:
        net = build(config_class(**json.loads((folder / CONFIG_NAME).read_text())))
        net.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    except (ValidationError, json.JSONDecodeError, SafetensorError, RuntimeError, OSError, InputError) as exc:
        raise CorruptWeightsError(f"cannot load the {what} at {str(folder)!r}: {exc}") from None
    return net.eval()


def split_sizes(size: int, holdout: int, steps: int, batch_size: int) -> tuple[int, int]:
    """``(train_size, holdout)``: at most a quarter of the data is held out; errors for unusable arguments."""
    if steps < 1 or batch_size < 1:
        raise InputError(f"expected steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    holdout = min(holdout, size // 4)
    if size - holdout < 1:
        raise InputError(f"the dataset holds {size} samples; at least 1 is needed to train")
    return size - holdout, holdout


def fit(
    net: torch.nn.Module,
    pairs: torch.utils.data.Dataset,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    what: str = "network",
    log: Callable[[dict[str, Any]], None] | None = None,
) -> list[float]:
    """Train ``net`` on ``pairs`` for ``steps`` seeded batches; returns the loss of every step (net left in eval mode)."""
    net.to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    sampler = torch.utils.data.RandomSampler(
        range(len(pairs)), replacement=True, num_samples=steps * batch_size, generator=torch.Generator().manual_seed(seed)
    )
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    losses: list[float] = []
    for step, (inputs, targets) in enumerate(loader):
        loss = loss_fn(net(inputs.to(device)), targets.to(device))
        if not torch.isfinite(loss):
            raise TrainingError(f"{what} loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log is not None:
            log({"step": step, "loss": losses[-1], "lr": schedule.get_last_lr()[0]})
    net.eval()
    return losses
