"""The training loop every trainer shares: accelerate, optimizer, checkpoints, resume, NaN guard, outputs.

A trainer subclasses :class:`Trainer` and supplies the models (``build``), the frozen encoding of a
batch (``prepare_inputs``), the random choices of a step (``sample_draws``), the loss
(``compute_loss``) and the final outputs (``save_outputs``). Everything else lives here and runs
the same on one CPU, one GPU or many processes (``torchrun`` / ``accelerate launch``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..datasets import TorchDataset, collate, open_dataset
from ..errors import CorruptCheckpointError, InputError, InputTypeError, TrainingError, TrainingInterrupted
from ..utils.atomic import check_output_folder, remove_temporary_folders
from ..utils.stopping import StopSignals
from .batches import StepBatches
from .checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_checkpoint,
    mark_corrupt,
    restore_rng,
    save_checkpoint,
)
from .config import OptimConfig, TrainConfig, dump_config, validate_config
from .progress import LossHistory, progress_bar

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUMMARY_NAME = "training_summary.json"


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns (also written to ``training_summary.json``)."""

    output_dir: Path
    outputs: dict[str, Path]
    step: int
    final_loss: float | None
    history: list[tuple[int, float, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(config: OptimConfig):
    """Multiplier of the base learning rate after ``step`` optimizer steps."""
    warmup, total, kind = config.warmup_steps, config.max_steps, config.lr_scheduler

    def factor(step: int) -> float:
        if kind != "constant" and warmup and step < warmup:
            return (step + 1) / warmup
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_accelerator(config: OptimConfig):
    """An Accelerator for this run; a run after another in the same process may change its settings."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps its settings in process-wide singletons; the process group (PartialState) stays
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is available")
    return Accelerator(cpu=cpu, mixed_precision=config.mixed_precision)


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class Trainer(ABC):
    """Base class of every trainer; ``Trainer(config).train()`` runs one.

    A subclass sets ``name`` (what a config's ``trainer:`` key and ``ccm train <name>`` select),
    ``config_class`` (the TrainConfig subclass it reads, defined beside it) and a one-line
    ``description``, and is registered through the ``register_trainers`` hook.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[TrainConfig]]
    description: ClassVar[str] = ""

    def __init__(self, config: TrainConfig | dict[str, Any], *, dataset: Dataset | None = None):
        if isinstance(config, dict):
            config = validate_config(self.config_class, {"trainer": self.name, **config})
        if not isinstance(config, self.config_class):
            raise InputTypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if config.trainer != self.name:
            raise InputError(f"the config is for trainer {config.trainer!r}, not {self.name!r}")
        self.config = config
        self.user_dataset = dataset  # passed in Python, or (at setup) the registered one data.dataset names
        self.accelerator = None
        self.model: torch.nn.Module | None = None  # the trainable module (wrapped for DDP once training starts)
        self.dataset: Dataset | None = None
        self._params: list[torch.nn.Parameter] = []
        self._validation_batch: dict[str, Any] | None = None

    # --- what a trainer supplies ----------------------------------------------------------

    @abstractmethod
    def build(self) -> torch.nn.Module:
        """Load and freeze the fixed models onto ``self.device``; return the trainable module (float32)."""

    def control_keys(self) -> list[str]:
        """Keys of precomputed control maps to read from the dataset."""
        return []

    @abstractmethod
    def prepare_inputs(self, batch: dict[str, Any]) -> Any:
        """Encode a collated batch with the frozen models (latents, text, control maps)."""

    @abstractmethod
    def sample_draws(self, inputs: Any) -> Any:
        """The random choices of one step (timesteps, noise, w, ...), from the global RNG."""

    @abstractmethod
    def compute_loss(self, inputs: Any, draws: Any) -> torch.Tensor:
        """The scalar loss for fixed inputs and draws."""

    @abstractmethod
    def save_outputs(self, output_dir: Path) -> dict[str, Path]:
        """Write the trained weights (main process only); the first entry is the one pushed to the hub."""

    def after_optimizer_step(self) -> None:
        """Runs after every optimizer step (EMA updates)."""

    def extra_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Further state dicts a checkpoint must hold (an EMA target)."""
        return {}

    def load_extra_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore what :meth:`extra_weights` saved."""

    def validation_rows(self, batch: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        """Labelled rows of images ([B, C, H, W] in [0, 1]) from the current weights for a collated batch.

        Called under ``torch.no_grad`` with the trained modules in eval mode; the default has none.
        """
        return []

    def sample_images(self, pipe, batch: dict[str, Any], *, consistency: bool, guidance_scale: float, control=None,
                      sampler: str | None = None) -> torch.Tensor:  # fmt: skip
        """Generate one image per caption of ``batch`` with ``pipe`` as the validation config asks (seeded)."""
        v = self.config.validation
        pipe.set_progress_bar_config(disable=True)
        output = pipe(
            list(batch["captions"]), control,
            num_inference_steps=v.sample_steps or (4 if consistency else 25),
            guidance_scale=v.guidance_scale or guidance_scale,
            sampler=sampler or ("consistency" if consistency else "ddim"),
            generator=torch.Generator().manual_seed(v.sample_seed), output_type="pt",
        )  # fmt: skip
        return output.images

    def validate(self, step: int, output_dir: Path) -> Path | None:
        """Render and save the validation grid of ``step`` (main process); returns its path, None when there is none."""
        from .validation import eval_mode, isolated_rng, save_samples, validation_batch

        if not self.accelerator.is_main_process:
            return None
        v = self.config.validation
        if self._validation_batch is None:
            self._validation_batch = validation_batch(self.dataset, len(v.prompts) if v.prompts else v.num_images)
            if v.prompts:
                self._validation_batch["captions"] = list(v.prompts)[: len(self._validation_batch["images"])]
        batch = self._validation_batch
        with isolated_rng(), eval_mode(self.unwrapped()), torch.no_grad(), self.accelerator.autocast():
            rows = self.validation_rows(batch)
        if not rows:
            return None
        return save_samples(rows, batch.get("captions", []), output_dir / "samples", step)

    def build_dataset(self) -> Dataset:
        data = self.config.data
        if self.user_dataset is not None:
            return TorchDataset(self.user_dataset, control_key=data.control_key, resolution=data.resolution)
        if data.path is None:
            raise TrainingError(
                "no training data: set data.path (a folder or .tar shards) or data.dataset (a registered dataset), "
                "or pass dataset= in Python"
            )
        return open_dataset(data.path, control_keys=self.control_keys(), resolution=data.resolution, default_caption=data.default_caption)

    def batch_sampler(self, dataset: Dataset, start: int, stop: int) -> Sampler:
        """Micro-batches ``start..stop-1`` of this process."""
        acc = self.accelerator
        return StepBatches(len(dataset), self.config.train.batch_size, seed=self.config.train.seed,
                           rank=acc.process_index, world_size=acc.num_processes, start=start, stop=stop)  # fmt: skip

    # --- shared machinery -----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the frozen models (the trainable module stays float32).

        On CPU they stay float32 too: CPU autocast runs group norms in float32 and rejects
        half-precision weights there, while matmuls and convolutions still compute in bf16.
        """
        if self.device.type == "cpu":
            return torch.float32
        return WEIGHT_DTYPES[self.config.train.mixed_precision]

    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def enable_gradient_checkpointing(self, *modules: torch.nn.Module) -> None:
        if self.config.train.gradient_checkpointing:
            for module in modules:
                if hasattr(module, "enable_gradient_checkpointing"):
                    module.enable_gradient_checkpointing()

    def optimizer_groups(self, params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        """AdamW's parameter groups over the trainable ``params``: one group at ``train.lr``. A trainer
        that trains parts at different rates returns one group per part, with its own ``lr``."""
        return [{"params": params}]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.unwrapped().named_parameters() if p.requires_grad}

    def setup(self) -> None:
        """Accelerator, models and dataset (idempotent); ``train`` calls it, tests may call it alone."""
        if self.model is not None:
            return
        cfg = self.config.train
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.accelerator = make_accelerator(cfg)
        seed_everything(cfg.seed)  # the same initial weights on every process
        model = self.build()
        if not any(p.requires_grad for p in model.parameters()):
            raise TrainingError(f"{self.name}: the trainable module has no parameter that requires grad")
        self.model = model.to(self.device).train()
        if self.user_dataset is None and self.config.data.dataset is not None:
            self.user_dataset = self.config.data.dataset.build()  # from here on it is read as a dataset passed in Python
        self.dataset = self.build_dataset()

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        inputs = self.prepare_inputs(batch)
        return self.compute_loss(inputs, self.sample_draws(inputs))

    def _resume(self, checkpoints: Path) -> tuple[Path, Checkpoint] | None:
        """The checkpoint ``checkpoint.resume`` asks for, loaded for this process; None to start from scratch.

        "latest" takes the newest intact checkpoint: a corrupt newer one is renamed ``corrupt-step-N``
        with a warning naming it and why. A checkpoint named explicitly is loaded or refused.
        """
        resume, acc = self.config.checkpoint.resume, self.accelerator

        def load(path: Path) -> Checkpoint:
            return load_checkpoint(path, rank=acc.process_index, world_size=acc.num_processes, trainer=self.name,
                                   objects=("optimizer", "scheduler"))  # fmt: skip

        if resume is False or resume == "":
            return None
        if resume is not True and resume != "latest":
            path = Path(resume)
            if not path.is_dir():
                raise TrainingError(f"checkpoint.resume: {resume!r} is not a checkpoint folder")
            return path, load(path)
        # every process tries the same checkpoints (all of each one's files), so all pick the same one
        found, corrupt = None, []
        for _, path in reversed(list_checkpoints(checkpoints, complete=False)):
            try:
                found = path, load(path)
                break
            except CorruptCheckpointError as error:
                corrupt.append(error)
        acc.wait_for_everyone()
        if corrupt and found is None:
            listed = "; ".join(str(e) for e in corrupt)
            raise TrainingError(
                f"{self.name}: no intact checkpoint to resume from in {str(checkpoints)!r} ({listed}). "
                "Move the damaged folders away (or delete them) to start from scratch, or resume from another checkpoint folder."
            )
        if acc.is_main_process:
            for error in corrupt:
                moved = mark_corrupt(error.checkpoint)
                warnings.warn(
                    f"{self.name}: {error}; resuming from the older {str(found[0])!r} instead, and the damaged one "
                    f"is renamed {moved.name!r} so it is not tried again",
                    RuntimeWarning, stacklevel=3,
                )  # fmt: skip
        acc.wait_for_everyone()
        return found

    def _load_weights(self, checkpoint: Checkpoint) -> None:
        trainable = checkpoint.weights.get("trainable", {})
        expected = set(self.trainable_state())
        if set(trainable) != expected:
            wrong = sorted(expected.symmetric_difference(trainable))[:3]
            raise TrainingError(f"the checkpoint's trainable weights do not match this model (first differences: {wrong})")
        self.unwrapped().load_state_dict(trainable, strict=False)
        self.load_extra_weights({k: v for k, v in checkpoint.weights.items() if k != "trainable"})

    def _restore(self, checkpoint: Checkpoint, optimizer, scheduler) -> None:
        self._load_weights(checkpoint)
        optimizer.load_state_dict(checkpoint.objects["optimizer"])
        scheduler.load_state_dict(checkpoint.objects["scheduler"])
        if "scaler" in checkpoint.objects and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(checkpoint.objects["scaler"])

    def _checkpoint(self, step: int, optimizer, scheduler, history: LossHistory) -> Checkpoint:
        objects = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if self.accelerator.scaler is not None:
            objects["scaler"] = self.accelerator.scaler.state_dict()
        weights = {"trainable": self.trainable_state(), **self.extra_weights()}
        return Checkpoint(step=step, weights=weights, objects=objects, meta={"trainer": self.name, "history": history.state()})

    def prepare_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over the trainable parameters and its schedule; wraps model and optimizer for accelerate."""
        t = self.config.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.optimizer_groups(params), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay)
        # stepped by hand once per optimizer step: accelerate's wrapper steps it once per process
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
        self.model, optimizer = self.accelerator.prepare(self.model, optimizer)
        self._params = params
        return optimizer, scheduler

    def training_step(self, micro_batches, optimizer, scheduler, *, step: int, last_saved: Path | None = None) -> float:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns the mean loss.

        Raises TrainingError before any update when a loss is not finite.
        """
        acc, t = self.accelerator, self.config.train
        count = len(micro_batches)
        loss_value = 0.0
        for micro, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext() if micro == count - 1 else acc.no_sync(self.model)
            with sync:
                with acc.autocast():
                    loss = self.loss(batch)
                # every process sees the same mean, so all stop together on NaN
                value = float(acc.reduce(loss.detach().float().reshape(1), "mean"))
                if not math.isfinite(value):
                    raise self._nan_error(step, value, last_saved)
                acc.backward(loss / count)
            loss_value += value / count
        if t.max_grad_norm is not None:
            acc.clip_grad_norm_(self._params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.after_optimizer_step()
        return loss_value

    def train(self) -> TrainResult:
        """Run (or resume) training to ``train.max_steps`` and write the outputs."""
        cfg, t = self.config, self.config.train
        # 1. accelerator, models, data; the output folder (checked first, so a typo costs no setup)
        check_output_folder(cfg.output_dir, "output_dir")
        check_output_folder(Path(cfg.output_dir) / "checkpoints", "output_dir")
        self.setup()
        acc = self.accelerator
        output_dir = Path(cfg.output_dir)
        checkpoints = output_dir / "checkpoints"
        if acc.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            remove_temporary_folders(checkpoints)
            dump_config(cfg, output_dir / "config.yaml")
        acc.wait_for_everyone()
        # 2. optimizer and learning-rate schedule
        optimizer, scheduler = self.prepare_optimizer()
        # 3. per-process random streams, then the checkpoint's if resuming
        seed_everything(t.seed + acc.process_index)
        history, start = LossHistory(), 0
        last_saved = None
        resumed = self._resume(checkpoints)
        if resumed is not None:
            last_saved, checkpoint = resumed
            self._restore(checkpoint, optimizer, scheduler)
            restore_rng(checkpoint.rng)
            history, start = LossHistory(checkpoint.meta.get("history")), checkpoint.step
        # 4. data in the order of the steps still to run
        accum = t.gradient_accumulation_steps
        sampler = self.batch_sampler(self.dataset, start * accum, t.max_steps * accum)
        # a private generator: creating the iterator must not draw from the global (checkpointed) RNG
        workers_seed = torch.Generator().manual_seed(t.seed + acc.process_index)
        loader = DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers, generator=workers_seed
        )
        batches = iter(loader)
        # 5. the loop
        bar = progress_bar(t.max_steps, start, enabled=cfg.log.progress and acc.is_local_main_process, desc=self.name)
        loop_started = time.perf_counter()
        try:
            with StopSignals() as stop:  # SIGTERM / SIGUSR1: checkpoint the step reached, then stop
                for step in range(start + 1, t.max_steps + 1):
                    micro_batches = [next(batches) for _ in range(accum)]
                    loss_value = self.training_step(micro_batches, optimizer, scheduler, step=step, last_saved=last_saved)
                    lr = scheduler.get_last_lr()[0]
                    history.add(step, loss_value, lr)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.2e}", refresh=False)
                    stopping = stop.requested(acc) and step < t.max_steps
                    if step % cfg.checkpoint.every == 0 or step == t.max_steps or stopping:
                        state = self._checkpoint(step, optimizer, scheduler, history)
                        last_saved = save_checkpoint(acc, checkpoints, state, keep_last=cfg.checkpoint.keep_last)
                    if stopping:
                        raise TrainingInterrupted(
                            f"{self.name}: stopped by {stop.name or 'a signal to another process'} at step {step} of {t.max_steps}; the checkpoint "
                            f"{str(last_saved)!r} holds it, and a run with checkpoint.resume (--resume) goes on from there exactly"
                        )
                    interval = cfg.validation.interval
                    if interval is not None and (step % interval == 0 or step == t.max_steps):
                        self.validate(step, output_dir)
        finally:
            bar.close()
        # 6. outputs, loss curve, summary (and the hub)
        return self._finish(output_dir, history, start, time.perf_counter() - loop_started)

    def export_checkpoint(self, checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Path]:
        """Write into ``output_dir`` the outputs a finished run writes (its model folders), from the
        weights of ``checkpoint``: to try or ship a model while its training goes on. Trains nothing."""
        check_output_folder(output_dir, "output_dir")
        self.setup()
        state = load_checkpoint(checkpoint, rank=0, world_size=None, trainer=self.name)
        self._load_weights(state)
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        return self.save_outputs(output_dir)

    def _nan_error(self, step: int, value: float, last_saved: Path | None) -> TrainingError:
        where = (
            f"the last good checkpoint is {str(last_saved)!r}; resume from it with --resume"
            if last_saved is not None
            else "no checkpoint was written before it"
        )
        return TrainingError(
            f"{self.name}: the loss is {value} at step {step}; training stopped before applying that update, and {where}. "
            "Lower train.lr, keep train.max_grad_norm set, or try another train.mixed_precision."
        )

    def _finish(self, output_dir: Path, history: LossHistory, start: int, seconds: float) -> TrainResult:
        from accelerate.utils import gather_object

        acc, cfg = self.accelerator, self.config
        acc.wait_for_everyone()
        ranks = gather_object([{"rank": acc.process_index, "pid": os.getpid(), "weights_sha256": weights_digest(self.trainable_state())}])
        if len({r["weights_sha256"] for r in ranks}) > 1:
            raise TrainingError(f"{self.name}: the processes ended with different weights: {ranks}")
        outputs: dict[str, Path] = {}
        steps_run = cfg.train.max_steps - start
        summary = {
            "trainer": self.name,
            "steps": cfg.train.max_steps,
            "steps_this_run": steps_run,
            "world_size": acc.num_processes,
            "device": str(acc.device),
            "mixed_precision": cfg.train.mixed_precision,
            "ranks": ranks,
            "final_loss": history.last,
            "loop_seconds": seconds,
            "steps_per_second": steps_run / seconds if seconds > 0 and steps_run else None,
        }
        if acc.is_main_process:
            outputs = self.save_outputs(output_dir)
            history.write_csv(output_dir / "loss.csv")
            if cfg.log.plot and history.rows:
                history.plot(output_dir / "loss.png", title=f"{self.name} loss")
            summary["outputs"] = {k: str(v) for k, v in outputs.items()}
            if cfg.hub.push:
                from .export import push_to_hub

                primary = next(iter(outputs.values()))
                summary["hub"] = push_to_hub(primary if primary.is_dir() else primary.parent, cfg.hub.repo_id, private=cfg.hub.private)
            (output_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        return TrainResult(output_dir, outputs, cfg.train.max_steps, history.last, list(history.rows), summary)
