"""The ``ccm`` command line: generate, serve, preprocess, plugins, conditions (and train, eval)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .utils.threads import THREADS_HELP, set_threads


def demo_model_dir() -> Path:
    """Where the tiny demo model is built: $CCM_CACHE/tiny-demo (default ~/.cache/ccm-sdk)."""
    return Path(os.environ.get("CCM_CACHE", Path.home() / ".cache" / "ccm-sdk")) / "tiny-demo"


def _options(pairs: list[str], option: str = "--option") -> dict[str, Any]:
    """``key=value`` pairs; values parse as JSON when they can (numbers, lists, true/false)."""
    from .utils.config_files import parse_value

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"ccm: expected {option} key=value, got {pair!r}")
        options[key] = parse_value(value)
    return options


class RegisteredNames:
    """The names in one registry, read only when first needed (argparse ``choices`` that load no plugin
    while ``ccm --help`` is built; ``ccm generate --help`` lists them)."""

    def __init__(self, registry: str):
        self.registry = registry

    def _names(self) -> list[str]:
        from . import registry

        return sorted(getattr(registry, self.registry).names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def _sampler(args: argparse.Namespace):
    """The sampler ``--sampler`` names with its ``--sampler-option`` values (an InputError names the accepted ones)."""
    from . import get_sampler

    return get_sampler(args.sampler, **_options(args.sampler_option, "--sampler-option"))


def _tiny_demo_model() -> tuple[Path, Path]:
    """Tiny random LCM + ControlNet in hub layout, built once into the cache (no network)."""
    from .testing.tiny import save_tiny_controlnet, save_tiny_pipeline

    model, controlnet = demo_model_dir() / "model", demo_model_dir() / "controlnet"
    if not (model / "model_index.json").is_file():
        save_tiny_pipeline(model)
    if not (controlnet / "config.json").is_file():
        save_tiny_controlnet(controlnet, model)
    return model, controlnet


EMBEDDED_MODEL = "world:lcm"  # the embedded default: ccm-world's consistency model (docs/world.md)


def embedded_default(condition: str) -> tuple[str, str] | None:
    """``(model, controlnet)`` of the embedded default for ``condition``, or None when it is not installed.

    The ControlNet is the world's DM ControlNet for the condition (CCM's "DM's ControlNet + CM"),
    else its consistency-trained one: on the world as built so far the DM one measured better on
    the consistency model (docs/results.md).
    """
    from .errors import MissingModelError, UnknownNameError
    from .models.loading import resolve_model_path

    try:
        resolve_model_path(EMBEDDED_MODEL)
    except (MissingModelError, UnknownNameError):
        return None
    for kind in ("dm", "cm"):
        controlnet = f"world:{kind}-controlnet-{condition}"
        try:
            resolve_model_path(controlnet)
        except MissingModelError:
            continue
        return EMBEDDED_MODEL, controlnet
    raise MissingModelError(f"the embedded default model has no ControlNet for the condition {condition!r}; pass --controlnet")


def _default_models(args: argparse.Namespace) -> tuple[str | Path, list[str]]:
    condition = args.condition or "sketch"
    found = embedded_default(condition)
    if found is not None:
        model, controlnet = found
        return model, args.controlnet or [controlnet]
    print(
        "ccm: no --model given and the embedded default model (ccm-world) is not installed: using a tiny model\n"
        "     with UNTRAINED random weights (built locally, no download). The output shows the pipeline working,\n"
        "     not a meaningful picture; pass --model for a real one.",
        file=sys.stderr,
    )
    model, default_controlnet = _tiny_demo_model()
    return model, args.controlnet or [str(default_controlnet)]


def _call_options(args: argparse.Namespace) -> dict[str, Any]:
    """Per-call inputs of the condition: ``--mask`` (the inpainting region) for the mask condition."""
    mask_path = getattr(args, "mask", None)
    if mask_path is None:
        if args.condition == "mask" and getattr(args, "image", None) is not None:
            raise SystemExit("ccm: --condition mask with --image needs --mask PATH (white = the region to generate)")
        return {}
    if args.condition != "mask":
        raise SystemExit(f"ccm: --mask is the inpainting region of --condition mask, got --condition {args.condition!r}")
    if getattr(args, "image", None) is None:
        raise SystemExit("ccm: --mask needs --image (the picture to inpaint); a ready --control map holds its mask already")
    from PIL import Image

    mask = _read_image(mask_path, "--mask", args).convert("L")
    if getattr(args, "size", None):
        mask = mask.resize((args.size, args.size), Image.NEAREST)
    return {"mask": mask}


def _max_side(args: argparse.Namespace) -> int:
    """The largest side of an input image: ``--max-size`` (``ccm serve``'s caps requests too), else the limit."""
    from .utils.image_files import MAX_SIDE_LIMIT

    return getattr(args, "max_size", None) or MAX_SIDE_LIMIT


def _read_image(path: str, option: str, args: argparse.Namespace):
    """The image file named by ``option``, its size checked from its header before it is decoded."""
    from .utils.image_files import open_image

    return open_image(path, what=option, max_side=_max_side(args),
                      limit=f"at most {_max_side(args)}x{_max_side(args)} pixels are taken (--max-size raises the limit)")


def _check_arguments(args: argparse.Namespace) -> None:
    """Sizes and the output path, checked before any model loads, so no work is lost to a typo."""
    from .errors import InputError
    from .utils.image_files import MAX_SIDE_LIMIT

    max_size = getattr(args, "max_size", None)
    if max_size is not None and not 1 <= max_size <= MAX_SIDE_LIMIT:
        raise InputError(f"--max-size: expected pixels a side from 1 to {MAX_SIDE_LIMIT}, got {max_size}")
    size = getattr(args, "size", None)
    if size is not None and not 1 <= size <= _max_side(args):
        raise InputError(f"--size: expected pixels a side from 1 to {_max_side(args)} (--max-size), got {size}")
    port = getattr(args, "port", None)
    if port is not None and not 0 <= port <= 65535:
        raise InputError(f"--port: expected 0 (any free one) to 65535, got {port}")
    seed = getattr(args, "seed", None)
    if seed is not None and not -(2**63) <= seed < 2**64:  # the range torch.Generator.manual_seed takes
        raise InputError(f"--seed: expected an integer from -2**63 to 2**64-1, got {seed}")
    if getattr(args, "out", None) is not None:
        check_output_path(args.out)


def check_output_path(out: str | os.PathLike) -> Path:
    """``out`` as an image file to write: not a directory, not under a file, an extension PIL writes."""
    from PIL import Image

    from .errors import InputError

    path = Path(out)
    if path.is_dir():
        raise InputError(f"--out: expected an image file path, got the directory {str(path)!r}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--out: {str(path)!r} lies under {str(parent)!r}, which is a file, not a directory")
            break
    Image.init()
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if path.suffix.lower() not in writable:
        raise InputError(f"--out: expected an image file name ending in .png, .jpg, .webp or another extension PIL writes, "
                         f"got {str(path)!r}")
    return path


def _open_source(path: str, size: int | None, args: argparse.Namespace, option: str):
    """The input image at ``path``, resized to ``size`` x ``size`` when given (RGBA stays RGBA)."""
    from PIL import Image

    source = _read_image(path, option, args)
    if size:
        source = source.convert("RGBA" if source.mode == "RGBA" else "RGB").resize((size, size))
    return source


def _control_images(args: argparse.Namespace, count: int, call_options: dict[str, Any] | None = None) -> list:
    """The control map(s): ``--control`` as it is, or ``--image`` run through ``--condition`` (or as it is).

    ``call_options``: the condition's per-call inputs when the caller has read them already.
    """
    from . import get_condition

    if args.control is not None and args.image is not None:
        raise SystemExit("ccm: give --image (to preprocess) or --control (a ready control map), not both")
    source_path = args.control or args.image
    if source_path is None:
        raise SystemExit("ccm: --image or --control is required when a ControlNet is used")
    if call_options is None:
        call_options = _call_options(args)
    source = _open_source(source_path, args.size, args, "--control" if args.control is not None else "--image")
    if args.image is not None and args.condition:
        control = get_condition(args.condition, **_options(args.option))(source, output_type="pil", **call_options)[0]
    else:
        control = source if source.mode == "RGBA" else source.convert("RGB")  # RGBA: a 4-channel mask map
    return [control] * count


def _model_sources(args: argparse.Namespace) -> tuple[str | Path, list[str]]:
    """``(model, ControlNet sources)`` from --model/--controlnet or the defaults."""
    if args.model is None:
        return _default_models(args)
    return args.model, args.controlnet or []


def _load_pipeline(args: argparse.Namespace, model: str | Path, controlnets: list[str]):
    """The pipeline of ``model`` (its family, SD or SDXL, read from the folder) and ``controlnets``,
    with --adapter/--lora/--unet."""
    from .pipeline import CCMPipeline

    return CCMPipeline.from_pretrained(model, controlnet=controlnets or None, adapter=args.adapter, lora=args.lora,
                                       unet=getattr(args, "unet", None))  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from .images import make_grid

    _check_arguments(args)
    sampler = _sampler(args)  # a bad --sampler-option fails before any model loads
    set_threads(args.threads)
    model, controlnets = _model_sources(args)
    control_images = _control_images(args, len(controlnets)) if controlnets else []  # bad input files fail before the model loads
    pipe = _load_pipeline(args, model, controlnets)
    generator = torch.Generator().manual_seed(args.seed)
    output = pipe(
        args.prompt,
        control_images if len(control_images) > 1 else (control_images[0] if control_images else None),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=generator,
        sampler=sampler,
        controlnet_conditioning_scale=args.control_scale,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = output.images[0]
    image.save(out)
    if control_images:
        control_path = out.with_name(out.stem + "_control" + out.suffix)
        control_images[0].save(control_path)
        scale = max(1, 256 // max(image.width, image.height))  # small models' images, enlarged to look at
        tiles = [im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST) for im in (control_images[0], image)]
        make_grid(tiles).save(out.with_name(out.stem + "_grid" + out.suffix))
        print(f"control map: {control_path}")
    print(f"image: {out}  ({output.nfe} network evaluations, {output.timings['total']:.2f} s, model {model})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .app.server import GenerationService, make_server, server_url

    _check_arguments(args)
    set_threads(args.threads)
    model, controlnets = _model_sources(args)
    pipe = _load_pipeline(args, model, controlnets)
    initial, inpainting = None, {}
    if controlnets and (args.control or args.image):
        call_options = _call_options(args)
        initial = _control_images(args, 1, call_options)[0]
        if "mask" in call_options:  # the page paints on the picture and its mask
            inpainting = {"initial_image": _open_source(args.image, args.size, args, "--image").convert("RGB"), "initial_mask": call_options["mask"]}
    service = GenerationService(pipe, model=str(model), condition=args.condition,
                                condition_options=_options(args.option), initial_prompt=args.prompt,
                                initial_control=initial, default_steps=args.steps, max_size=args.max_size,
                                max_queue=args.max_queue, **inpainting)
    server = make_server(service, host=args.host, port=args.port, verbose=args.verbose, allow_hosts=args.allow_host,
                         allow_origins=args.allow_origin, read_timeout=args.read_timeout, max_connections=args.max_connections)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"ccm serve: listening on {args.host}: anyone who reaches this address can use the model; requests must name "
              "this server in their Host header (--allow-host NAME adds the names clients use)", file=sys.stderr)
    print(f"ccm serve: open {server_url(server)}  (model {model}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from . import get_condition

    _check_arguments(args)
    condition = get_condition(args.condition, **_options(args.option))
    control = condition(_read_image(args.image, "--image", args), output_type="pil", **_call_options(args))[0]
    out = Path(args.out)  # reached only with a checked map: a condition's bad output raises ConditionOutputError above
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")  # same extension: PIL picks the format from it
    control.save(partial)
    os.replace(partial, out)
    print(f"{args.condition} control map: {args.out} ({control.width}x{control.height}, {condition.channels} channels)")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import plugin_failures, plugin_infos

    infos, failures = plugin_infos(), plugin_failures()
    if args.json:
        print(json.dumps({"plugins": [vars(i) for i in infos], "failed": [vars(f) for f in failures]}, indent=2))
        return 0
    for info in infos:
        print(f"{info.name:<40} {info.version:<10} {', '.join(info.hooks)}")
    for failure in failures:
        where = f"{failure.kind} in {failure.hook}" if failure.hook else failure.kind
        print(f"{failure.plugin:<40} FAILED ({where}): {failure.error}")
    return 0


def cmd_conditions(args: argparse.Namespace) -> int:
    from .conditions.weights import in_hub_cache
    from .registry import conditions

    for entry in conditions.entries():
        cls = entry.obj
        repo = getattr(cls, "weights", None)
        download = f"  [needs download: {repo}]" if repo and not in_hub_cache(repo) else ""
        print(f"{entry.name:<10} {cls.channels} ch  [{entry.plugin}]{download}  {cls.description}")
    return 0


def _summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s docstring, on one line (its ``description`` when it has one)."""
    text = getattr(obj, "description", "") or (obj.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(text.split())


def _option_fields(options_cls: Any) -> str:
    """``name=default`` for every field of an Options model, or ``no options``."""
    fields = getattr(options_cls, "model_fields", {})
    if not fields:
        return "no options"
    return ", ".join(f"{name}={({} if field.default_factory is dict else field.default)!r}" for name, field in fields.items())


def cmd_samplers(args: argparse.Namespace) -> int:
    from .registry import samplers

    for entry in samplers.entries():
        cls = entry.obj
        print(f"{entry.name:<12} {cls.min_steps}-{cls.max_steps} steps  [{entry.plugin}]  {_summary(cls)}")
        print(f"{'':<12} --sampler-option: {_option_fields(cls.Options)}")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from .registry import adapters

    for entry in adapters.entries():
        print(f"{entry.name:<12} [{entry.plugin}]  {_summary(entry.obj)}")
    return 0


def cmd_controlnets(args: argparse.Namespace) -> int:
    from .registry import controlnets

    for entry in controlnets.entries():
        print(f"{entry.name:<12} [{entry.plugin}]  {_summary(entry.obj)}")
    return 0


MAX_SIZE_HELP = ("largest side of an input image, read from its header before it is decoded (default: 4096, "
                 "the most it may be)")
GENERATE_EPILOG = """\
examples:
  ccm generate --prompt "a red circle on a blue background" --image photo.png --condition sketch
  ccm generate --model MODEL --controlnet CONTROLNET --condition canny --image photo.png --prompt "a cat" --steps 2
  ccm generate --prompt "a cat" --control map.png --sampler consistency --sampler-option gamma=0.3
"""
MASK_HELP = "with --condition mask: the region to generate (white) in a black-and-white image the size of --image"


def _add_model_arguments(parser: argparse.ArgumentParser, *, start: str = "") -> None:
    """The model and control-map options ``generate`` and ``serve`` share (``start``: what serve adds to the help)."""
    parser.add_argument("--model", help=f"model folder, hub id or source:name (default: the embedded {EMBEDDED_MODEL} with its "
                        "ControlNet for --condition; a tiny untrained demo model when that is not installed)")
    parser.add_argument("--controlnet", action="append", metavar="SOURCE",
                        help="ControlNet folder, hub id or source:name (repeatable; default: none with --model, else the "
                        "embedded model's ControlNet for --condition)")
    parser.add_argument("--adapter", metavar="SOURCE", help="unified adapter folder or hub id, combining the ControlNets "
                        "(default: none)")
    parser.add_argument("--lora", metavar="PATH", help="LoRA file or folder, e.g. LCM-LoRA (default: none)")
    parser.add_argument("--unet", metavar="SOURCE", help="UNet folder or hub id that replaces the model's, e.g. a distilled LCM UNet "
                        "such as an LCM-SDXL (default: the model's own)")
    parser.add_argument("--condition", metavar="NAME", help="condition that turns --image into the control map, e.g. canny; "
                        "`ccm conditions` lists them (default: none, so --image is the map as it is; the embedded model "
                        "takes sketch)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="condition option (repeatable; default: the condition's own defaults)")
    parser.add_argument("--image", metavar="PATH", help="input image, turned into the control map by --condition (as it is "
                        "without one)" + start + " (default: none)")
    parser.add_argument("--control", metavar="PATH", help="a ready control map (not preprocessed; --condition still picks the "
                        "default ControlNet)" + start + " (default: none)")
    parser.add_argument("--size", type=int, metavar="PIXELS", help="resize the input image to PIXELS x PIXELS first "
                        "(default: keep its size)")
    parser.add_argument("--mask", metavar="PATH", help=MASK_HELP + " (default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccm", description="Controllable consistency-model image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a controlled image", description="Generate one image from a prompt and "
                         "a control map (--image through --condition, or a ready --control map).", epilog=GENERATE_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(gen)
    gen.add_argument("--prompt", required=True, help="what to draw (required)")
    gen.add_argument("--steps", type=int, default=4, metavar="N", help="sampling steps, one network call each "
                     "(default: %(default)s)")
    gen.add_argument("--guidance", type=float, default=None, metavar="SCALE", help="guidance scale, folded into the "
                     "consistency model's step as LCM does (default: the model's recommended scale, its "
                     "ccm_defaults.json, else 8.0)")
    gen.add_argument("--control-scale", type=float, default=1.0, metavar="SCALE", help="strength of the ControlNet "
                     "residuals (default: %(default)s)")
    gen.add_argument("--sampler", default="consistency", choices=RegisteredNames("samplers"), metavar="NAME",
                     help="sampling method: %(choices)s; `ccm samplers` describes them (default: %(default)s)")
    gen.add_argument("--sampler-option", action="append", default=[], metavar="KEY=VALUE",
                     help="sampler option, e.g. gamma=0.3 for consistency or eta=0.5 for ddim (repeatable; default: the "
                     "sampler's own defaults, listed by `ccm samplers`)")
    gen.add_argument("--seed", type=int, default=0, help="random seed of the starting noise (default: %(default)s)")
    gen.add_argument("--out", default="outputs/ccm.png", metavar="PATH", help="image file to write (.png, .jpg, ...; checked "
                     "before generating); the control map and a side-by-side grid go beside it (default: %(default)s)")
    gen.add_argument("--max-size", type=int, metavar="PIXELS", help=MAX_SIZE_HELP)
    gen.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="a local web page: draw, inpaint, img2img, or stream a camera or the screen through the model")
    _add_model_arguments(srv, start=" to start from (its size is the drawing size); requests sent as 'image' use --condition too")
    srv.add_argument("--prompt", default="", help="the prompt to start with")
    srv.add_argument("--steps", type=int, default=4, help="the steps to start with")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    srv.add_argument("--port", type=int, default=7860, help="port (0: any free one; default: %(default)s)")
    srv.add_argument("--max-size", type=int, metavar="PIXELS", help="largest side of an image a request may send, and so of "
                     "the output (default: the model's native size, or the starting map's if larger; at most 4096)")
    srv.add_argument("--max-queue", type=int, default=4, metavar="N",
                     help="requests that may wait while one generates; more are answered 503 (default: %(default)s)")
    srv.add_argument("--read-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="time a client has to send a whole request; slower ones are dropped (default: %(default)s)")
    srv.add_argument("--max-connections", type=int, default=32, metavar="N",
                     help="connections served at once; more are answered 503 (default: %(default)s)")
    srv.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="also answer requests whose Host header is NAME, on any port (repeatable; '*': any name, which "
                     "lets DNS-rebinding pages in; default: only localhost, 127.0.0.1, [::1] and --host, on --port)")
    srv.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                     help="let web pages at ORIGIN (e.g. https://app.example) call the API, with CORS headers (repeatable; "
                     "'*': any site; default: only the server's own page)")
    srv.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    srv.add_argument("--verbose", action="store_true", help="log every request")
    srv.set_defaults(func=cmd_serve)

    pre = sub.add_parser("preprocess", help="run a condition on an image and save the control map")
    pre.add_argument("--condition", required=True, metavar="NAME", help="the condition to run, e.g. canny; `ccm conditions` "
                     "lists them (required)")
    pre.add_argument("--image", required=True, metavar="PATH", help="the input image (required)")
    pre.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="condition option (repeatable; default: the condition's own defaults)")
    pre.add_argument("--out", required=True, metavar="PATH", help="image file to write (.png, .jpg, ...; required)")
    pre.add_argument("--max-size", type=int, metavar="PIXELS", help=MAX_SIZE_HELP)
    pre.add_argument("--mask", metavar="PATH", help=MASK_HELP + " (default: none)")
    pre.set_defaults(func=cmd_preprocess)

    plug = sub.add_parser("plugins", help="list plugins, their versions, and those that failed")
    plug.add_argument("--json", action="store_true")
    plug.set_defaults(func=cmd_plugins)

    cond = sub.add_parser("conditions", help="list the registered conditions")
    cond.set_defaults(func=cmd_conditions)
    sub.add_parser("samplers", help="list the registered samplers, their step ranges and options").set_defaults(func=cmd_samplers)
    sub.add_parser("adapters", help="list the registered adapters").set_defaults(func=cmd_adapters)
    sub.add_parser("controlnets", help="list the registered ControlNet providers").set_defaults(func=cmd_controlnets)
    from .training import add_train_parser
    add_train_parser(sub)
    from .eval.cli import add_eval_parser
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import CCMError, Interrupted

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as exc:  # asked to stop, and what was done is saved: not an error
        print(f"ccm: stopped: {exc}", file=sys.stderr)
        return 1
    except CCMError as exc:
        print(f"ccm: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"ccm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
