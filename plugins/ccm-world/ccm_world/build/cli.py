"""The ``ccm-world`` command: ``build`` runs a :class:`~ccm_world.build.run.WorldBuild`, ``noise-levels``
measures ControlNets by noise level (noise_levels.py).

    ccm-world build [--preset full|tiny|FILE] [--stage NAME | --until NAME] [--work-dir outputs/world] [--jobs N]
    python -m ccm_world.build [same options]
"""

from __future__ import annotations

import argparse
import sys

from ccm_sdk.errors import InputError, Interrupted
from ccm_sdk.utils.stopping import parse_duration, time_limit

from .config import PRESET_DIR, BuildError, load_preset
from .run import WorldBuild, measure


def build_parser(prog: str = "ccm-world build") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Rebuild the world's models with the SDK's trainers, stage by stage.")
    parser.add_argument("--preset", default="full", help=f"a preset name ({', '.join(sorted(p.stem for p in PRESET_DIR.glob('*.yaml')))}: ccm_world/build/presets/<name>.yaml) or a YAML file")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stage", help="build only this stage (a unit like dm-controlnet-sketch, or a group like dm-controlnets)")
    which.add_argument("--until", help="build every stage up to and including this one")
    parser.add_argument("--work-dir", default="outputs/world", help="where every stage's outputs and checkpoints go")
    parser.add_argument("--models-dir", help="where pack installs the models (default: the plugin's ccm_world/models)")
    parser.add_argument("--force", action="store_true", help="rebuild the selected stages even if done (their outputs are deleted)")
    parser.add_argument("--plan", action="store_true", help="print the stages, their estimates and states; run nothing")
    parser.add_argument("--partial", action="store_true",
                        help="with --stage pack: pack and install the models built so far (the teacher and the LCM at least)")
    parser.add_argument("--measure", type=int, metavar="N", help="time N full-size steps of every training stage in --work-dir")
    parser.add_argument("--archive", metavar="DIR",
                        help="a folder that outlives the machine (e.g. in version control): finished units are copied "
                             "into it, and units found there are restored before they would be built")
    parser.add_argument("--save-archive", action="store_true",
                        help="with --archive: copy what the work dir holds now (finished units, the last checkpoint of "
                             "unfinished ones) into the archive, and train nothing")
    parser.add_argument("--stop-after", metavar="DURATION",
                        help="stop cleanly once the build has run this long (90, 45s, 20m, 2h, 1h30m): the stage in "
                             "training checkpoints (and is archived), no new stage starts; the same command goes on")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run up to N stages side by side once their inputs are built, each in its own process with "
                             "the preset's threads shared out (2 on a 2-core CPU: 1.25x the training steps an hour)")
    parser.add_argument("--reuse-installed", action="store_true",
                        help="take the feature and map nets from the installed pack where they are exactly this build's "
                             "(same fingerprint, kept in float32) instead of training them again")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset key (dotted), e.g. vae.seed=3")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "python -m ccm_world.build") -> int:
    from transformers.utils import logging as transformers_logging

    from ccm_sdk.utils.config_files import parse_assignments

    args = build_parser(prog).parse_args(argv)
    try:
        preset = load_preset(args.preset, parse_assignments(args.set))
        transformers_logging.disable_progress_bar()  # one bar per weight file read or written: dozens per stage
        if args.force and not (args.stage or args.until):
            raise BuildError("--force deletes the outputs of the stages it rebuilds: name them with --stage or --until")
        if args.jobs < 1:
            raise BuildError(f"--jobs N needs N >= 1, got {args.jobs}")
        if args.jobs > 1 and (args.measure is not None or args.save_archive or args.partial):
            raise BuildError("--jobs runs stages side by side: not with --measure, --save-archive or --partial")
        if args.measure is not None:
            if args.measure < 1 or args.stage or args.force:
                raise BuildError(f"--measure N (N >= 1, got {args.measure}) runs every stage up to --until; not with --stage or --force")
            measure(preset, args.measure, args.work_dir, until=args.until or "feature-net")
            return 0
        build = WorldBuild(preset, args.work_dir, models_dir=args.models_dir, archive=args.archive)
        if args.save_archive:
            if args.stage or args.until or args.force or args.plan or args.partial:
                raise BuildError("--save-archive copies the whole work dir's progress: not with --stage, --until, --force, --plan or --partial")
            build.save_archive()
            return 0
        if args.partial:
            if args.stage != "pack" or args.force or args.plan:
                raise BuildError("--partial goes with --stage pack only (it packs what is built so far)")
            build.pack_partial()
            return 0
        if args.plan:
            print(build.plan(build.select(args.stage, args.until)))
            return 0
        if args.reuse_installed:
            from .reuse import reuse_installed

            reuse_installed(build)
        with time_limit(parse_duration(args.stop_after) if args.stop_after else None):
            build.run(stage=args.stage, until=args.until, force=args.force, jobs=args.jobs)
    except (BuildError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"stopped: {exc}; run the same command again to go on", file=sys.stderr)
        return 1
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``ccm-world build ...`` and ``ccm-world noise-levels ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ccm-world build [--preset full|tiny|FILE] [--stage NAME | --until NAME] [--work-dir DIR] ...\n"
              "       ccm-world noise-levels --condition NAME --out DIR LABEL=CONTROLNET ...\n\n"
              "commands:\n  build         rebuild the world's models stage by stage (ccm-world build --help)\n"
              "  noise-levels  one consistency step from each noise level, per ControlNet (ccm-world noise-levels --help)")  # fmt: skip
        return 0 if argv else 2
    if argv[0] == "noise-levels":
        from .noise_levels import main as noise_levels

        return noise_levels(argv[1:])
    if argv[0] != "build":
        print(f"error: unknown command {argv[0]!r}; commands: build, noise-levels", file=sys.stderr)
        return 2
    return main(argv[1:], prog="ccm-world build")
