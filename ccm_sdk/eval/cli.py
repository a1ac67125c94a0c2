"""``ccm eval --config FILE``: run an eval config and write its report (see docs/evaluation.md)."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  ccm eval --config configs/eval/world_table2.yaml
  ccm eval --config configs/eval/world_table2.yaml --methods cm-controlnet+cm --num-samples 64
  ccm eval --config configs/eval/world_reverse_transfer.yaml --validate
  ccm eval --config configs/eval/world_table2.yaml --stop-after 1h     # then the same with --resume
"""


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``ccm``'s subparsers."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate methods (FID, Fidelity, NFE, time) and run the correlation analysis",
        description="Generate with every method of an eval config and score it; see docs/evaluation.md.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="eval config (YAML or JSON)")
    parser.add_argument("--output-dir", help="where to write results (default: the config's output_dir)")
    parser.add_argument("--num-samples", type=int, help="override num_samples")
    parser.add_argument("--seed", type=int, help="override seed (the initial noise of every cell; run a few to see FID's spread)")
    parser.add_argument("--methods", help="comma-separated preset or method names to run (default: all)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override device")
    parser.add_argument("--validate", action="store_true", help="check the config and its names, run nothing")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the cells an earlier, stopped run kept in <output-dir>/progress, where their settings are unchanged")
    parser.add_argument("--stop-after", metavar="DURATION",
                        help="stop between two cells once it has run this long (90, 45s, 20m, 2h, 1h30m); --resume goes on")
    parser.set_defaults(func=cmd_eval)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from .config import check_names, expand_methods, load_eval_config
    from .runner import run_evaluation

    overrides = {key: value for key, value in (("output_dir", args.output_dir), ("num_samples", args.num_samples),
                                               ("seed", args.seed), ("device", args.device)) if value is not None}  # fmt: skip
    config = load_eval_config(args.config, overrides)
    only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
    if only == []:
        raise InputError(f"--methods: expected comma-separated preset or method names, got {args.methods!r}")
    from ..utils.atomic import check_output_folder
    from ..utils.stopping import parse_duration, time_limit

    check_output_folder(config.output_dir, "output_dir")  # checked with --validate too, before any model loads
    stop_after = parse_duration(args.stop_after) if args.stop_after else None
    if args.validate:
        methods = expand_methods(config, only)
        check_names(config, methods)
        print(f"{args.config}: valid ({len(methods)} methods x {len(config.conditions)} conditions)")
        return 0
    from pathlib import Path

    with time_limit(stop_after):
        result = run_evaluation(config, methods=only, progress=Path(config.output_dir) / "progress", resume=args.resume)
    paths = result.write(config.output_dir)
    from .report import markdown_table

    print(markdown_table(result))
    print(f"results: {paths['markdown']}, {paths['csv']}; figures: {paths['samples']}, {paths['metrics']}")
    return 0
