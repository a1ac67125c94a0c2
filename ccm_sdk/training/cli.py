"""``ccm train <trainer> --config FILE [overrides]`` and ``python -m ccm_sdk.training`` (for torchrun).

Overrides: ``section.key=value``, ``--section.key value``, ``--key value`` for a key only one
section has (``--max_steps 10``), ``--flag`` alone for true. ``--resume`` continues from the
newest checkpoint in ``output_dir`` (or ``--resume CHECKPOINT``); ``--stop-after 2h`` checkpoints
and stops once the run has lasted that long; ``--export [CHECKPOINT]`` writes a checkpoint's model
folders without training. Values parse as JSON when they can. This module imports nothing heavy
until a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NamedTuple

EPILOG = """\
examples:
  ccm train ct_controlnet --config configs/train/ct_controlnet.yaml
  ccm train lcd --config configs/train/lcd.yaml train.lr=1e-4 --max_steps 10
  ccm train ct_controlnet --config configs/train/ct_controlnet.yaml --resume
  ccm train ct_controlnet --config configs/train/ct_controlnet.yaml --resume --stop-after 1h30m
  ccm train ct_controlnet --config configs/train/ct_controlnet.yaml --export     # the newest checkpoint's ControlNet
  torchrun --nproc_per_node 2 -m ccm_sdk.training ct_controlnet --config FILE
  ccm train <trainer> --help     lists every config key with its default
"""


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``ccm``'s subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="train a VAE, a text-to-image diffusion model, a ControlNet, the unified adapter, an LCM (distillation), "
        "a DreamBooth model, or with a plugin's trainer",
        description="Train with one of the registered trainers; see docs/training.md.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    _configure(parser)
    return parser


def trainer_listing() -> str:
    """One line per registered trainer: its name, its one-line description and the plugin that registered it."""
    from ..registry import trainers

    return "\n".join(f"  {e.name:<14} {e.obj.description}  [{e.plugin}]" for e in trainers.entries())


class _HelpWithTrainers(argparse.Action):
    """``-h`` before a trainer name: the help with the registered trainers listed (collected only now,
    so building the ``ccm`` parser loads no plugin)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = f"trainers:\n{trainer_listing()}\n\n{EPILOG}"
        parser.print_help()
        parser.exit()


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-h", "--help", action=_HelpWithTrainers, help="show this help, with the registered trainers, and exit")
    parser.add_argument("trainer", metavar="TRAINER", help="a registered trainer (--help lists them)")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="...", help="--config FILE, --resume [CHECKPOINT], overrides")
    parser.set_defaults(func=cmd_train)


class TrainArgs(NamedTuple):
    """What the tokens after ``ccm train <trainer>`` ask for."""

    config: str | None
    overrides: list[tuple[str, Any]]
    show_help: bool
    stop_after: float | None  # seconds
    export: str | None  # a checkpoint folder, or "latest"


def parse_train_args(tokens: list[str]) -> TrainArgs:
    """The config file, overrides and options from the tokens after the trainer name."""
    from ..errors import InputError
    from ..utils.config_files import parse_value
    from ..utils.stopping import parse_duration

    config, overrides, show_help, stop_after, export = None, [], False, None, None
    i = 0
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        takes_value = following is not None and not following.startswith("--")
        i += 1
        if token in ("-h", "--help"):
            show_help = True
        elif token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            if not eq:
                if key in ("resume", "export"):  # bare, or followed by a CHECKPOINT (not an override)
                    value = "latest"
                    if takes_value and "=" not in following:
                        value, i = following, i + 1
                elif takes_value:
                    value, i = following, i + 1
                else:
                    value = "true"
            if key == "config":
                config = value
            elif key == "stop-after":
                stop_after = parse_duration(value)
            elif key == "export":
                export = value
            else:
                overrides.append(("checkpoint.resume" if key == "resume" else key, parse_value(value)))
        elif "=" in token:
            key, _, value = token.partition("=")
            overrides.append((key, parse_value(value)))
        else:
            raise InputError(f"unexpected argument {token!r}: expected --config FILE, --resume, key=value or --key value")
    return TrainArgs(config, overrides, show_help, stop_after, export)


def cmd_train(args: argparse.Namespace) -> int:
    from . import get_trainer
    from .config import describe_config, load_config

    trainer = get_trainer(args.trainer)  # an unknown name raises, listing the registered ones
    config_path, overrides, show_help, stop_after, export = parse_train_args(args.args)
    if show_help:
        print(f"usage: ccm train {args.trainer} --config FILE [--resume [CHECKPOINT]] [--stop-after 2h] [--export [CHECKPOINT]] "
              "[key=value | --key value ...]\n")
        print("--stop-after DURATION: checkpoint and stop once it has run this long (90, 45s, 20m, 2h, 1h30m); --resume goes on")
        print("--export [CHECKPOINT]: write the model folders of a checkpoint (default: the newest) into "
              "<output_dir>/export/<checkpoint>; trains nothing\n")
        print(f"{args.trainer}: {trainer.description}\n" if trainer.description else "", end="")
        print(f"{args.trainer} config keys (default):")
        print(describe_config(trainer.config_class))
        return 0
    config = load_config(args.trainer, config_path, overrides)
    if export is not None:
        return _export(args.trainer, config, export)
    from . import train
    from ..utils.stopping import time_limit

    with time_limit(stop_after):
        result = train(config)
    for name, path in result.outputs.items():  # filled on the main process only
        print(f"{name}: {path}")
    if result.outputs and result.final_loss is not None:
        print(f"loss: {result.output_dir / 'loss.csv'}  (final {result.final_loss:.5g} after {result.step} steps)")
    return 0


def _export(trainer_name: str, config, which: str) -> int:
    from ..errors import TrainingError
    from . import get_trainer
    from .checkpoint import latest_checkpoint

    checkpoints = Path(config.output_dir) / "checkpoints"
    checkpoint = latest_checkpoint(checkpoints) if which == "latest" else Path(which)
    if checkpoint is None:
        raise TrainingError(f"no checkpoint to export in {str(checkpoints)!r}")
    target = Path(config.output_dir) / "export" / checkpoint.name
    for name, path in get_trainer(trainer_name)(config).export_checkpoint(checkpoint, target).items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ccm_sdk.training``."""
    from ..errors import CCMError, Interrupted

    parser = argparse.ArgumentParser(
        prog="python -m ccm_sdk.training", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False
    )
    _configure(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as exc:
        print(f"ccm train: stopped: {exc}", file=sys.stderr)
        return 1
    except CCMError as exc:
        print(f"ccm train: error: {exc}", file=sys.stderr)
        return 2
