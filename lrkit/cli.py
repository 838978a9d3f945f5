"""`lrkit` command line: one map from subcommands to library functions.

Errors: a refused command line, lrkit's own errors (`ConceptError`, `DataError`, `ConfigError`, `TrainingError`,
`EvalError`, `BaseModelError`, ... — every exception class defined in lrkit) and ordinary user-input errors
(`ValueError`, `OSError` such as a missing file, `ImportError` of an optional dependency) print one line,
`lrkit COMMAND: error: ...`, and exit with code 2. Anything else is a bug: one line saying so, exit code 1.
`--debug` (or LRKIT_DEBUG=1) prints the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from lrkit.argparsing import CommandLineError, argument_parser, plain_argument_parser, suggest
from lrkit.errors import is_user_error
from lrkit.evaluation.cli import main as _eval


def _train(argv: list[str]) -> int:
    from lrkit.training import train_concept
    from lrkit.training.config import build_parser, config_from_namespace

    parser = build_parser("lrkit train")
    namespace = parser.instantiate(parser.parse_args(argv))
    bundle = train_concept(config_from_namespace(namespace))
    print(bundle)
    return 0


def _export(argv: list[str]) -> int:
    from lrkit.training import export_checkpoint

    parser = plain_argument_parser("lrkit export", "Write a concept bundle from a training checkpoint.")
    parser.add_argument("checkpoint", help="a checkpoint written by `lrkit train` (OUTPUT_DIR/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    parser.add_argument("--base", default=None, help="load the base model from here instead of the recorded id")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, base=args.base))
    return 0


def _generation_parser(prog: str, description: str):
    """Shared options of `generate` and `run`: GenerationOptions fields (or --config YAML), prompts, seeds."""
    from jsonargparse import ActionConfigFile

    from lrkit.inference import GenerationOptions
    from lrkit.inference.options import moved_keys

    parser = argument_parser(prog, description, default_meta=False, moved_keys=moved_keys())
    parser.add_argument("--config", action=ActionConfigFile, help="generation options YAML (configs/infer/*.yaml)")
    parser.add_argument("--base", default=None, help="base model: tiny-random, toy, hub id, folder or .safetensors "
                        "(default: the base the concept records; a new `lrkit run` concept trains on tiny-random)")
    parser.add_argument("--family", choices=["sd", "sdxl"], default=None,
                        help="the base's model family, sd (1.x/2.x) or sdxl (default: told from the base)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); '{}' becomes '<token> <class>'")
    parser.add_argument("--prompts", default=None, help="file with one prompt a line (data/prompts/*.txt)")
    parser.add_argument("--seeds", type=list[int], default=[0, 1], help="seeds, e.g. [0,1,2,3]")
    parser.add_argument("--out", default=None, help="output folder")
    parser.add_argument("--sam_checkpoint", default=None, help="SAM checkpoint (sam_vit_b/l/h_*.pth) for subject masks")
    parser.add_argument("--intermediates", type=bool, default=False, help="also save layouts, masks and grids")
    parser.add_class_arguments(GenerationOptions, "options")
    return parser


def _prompts(args, prog: str) -> list[str]:
    from lrkit.jobs import read_prompts

    blank = [p for p in args.prompt if not p.strip()]
    if blank:
        raise CommandLineError(prog, f"--prompt {blank[0]!r} is empty; give the text of a prompt")
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise CommandLineError(prog, "give --prompt TEXT or --prompts FILE")
    return prompts


def _seeds(args, prog: str) -> list[int]:
    seeds = list(args.seeds)
    if not seeds:
        raise CommandLineError(prog, "--seeds is empty; give at least one seed, e.g. [0,1]")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise CommandLineError(prog, f"--seeds lists {twice} more than once; give each seed once")
    return seeds


def _generate(argv: list[str]) -> int:
    from lrkit.concept import Concept, recorded_base, recorded_base_error
    from lrkit.inference import LayoutRetouchPipeline
    from lrkit.jobs import fill_prompts, generate_to_folder
    from lrkit.models import BaseModelError

    parser = _generation_parser("lrkit generate", "Generate images of a concept (vanilla, personalized, layout, "
                                "layout-retouch, dual-reference: --options.dual_reference.style_reference IMAGE).")
    parser.add_argument("--concept", required=True, help="concept bundle folder")
    parser.add_argument("--force", type=bool, default=False, help="apply the concept even to another base model")
    parser.add_argument("--layout_image", default=None, help="retouch into this image instead of a generated layout")
    parser.add_argument("--token", default=None,
                        help="multi-concept bundles: the token '{}' stands for and layout-retouch retouches in")
    args = parser.instantiate(parser.parse_args(argv))
    prompts, seeds = _prompts(args, parser.prog), _seeds(args, parser.prog)
    concept = Concept.load(args.concept)
    if args.token is not None:
        concept = concept.for_token(args.token)
    base = args.base or recorded_base([concept])
    try:
        pipeline = LayoutRetouchPipeline.from_concept(base, concept, sam_checkpoint=args.sam_checkpoint,
                                                      force=args.force, family=args.family)
    except BaseModelError as err:
        if args.base:
            raise
        raise recorded_base_error(err, base) from err
    prompts = fill_prompts(prompts, pipeline.concept, require_token=args.options.mode != "vanilla")
    out = args.out or "outputs/generate"
    generate_to_folder(pipeline, prompts, seeds, out, args.options, intermediates=args.intermediates,
                       skip_existing=False, layout_image=args.layout_image)
    print(out)
    return 0


def _run(argv: list[str]) -> int:
    from lrkit.jobs import photos_to_images

    parser = _generation_parser("lrkit run", "Photos -> concept -> Layout-and-Retouch images and a contact sheet.")
    parser.add_argument("--photos", required=True, help="folder of 3-10 photos of the subject")
    parser.add_argument("--class_word", "--class-word", required=True, help="the subject's class, e.g. dog")
    parser.add_argument("--method", default="lora", help="training method (lora, dreambooth, textual_inversion, pivotal)")
    parser.add_argument("--max_steps", type=int | None, default=None, help="training steps (default: the method's)")
    parser.add_argument("--resolution", type=int | None, default=None, help="training and generation resolution")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --out holds from other inputs: train the concept again and make its images again")
    args = parser.instantiate(parser.parse_args(argv))
    train = {"max_steps": args.max_steps} if args.max_steps is not None else {}
    prompts, seeds = _prompts(args, parser.prog), _seeds(args, parser.prog)
    _check_run_training(parser.prog, args, prompts, train)
    sheet = photos_to_images(args.photos, args.class_word, prompts, base=args.base, family=args.family,
                             out_dir=args.out or "outputs/run", method=args.method, seeds=seeds,
                             options=args.options, resolution=args.resolution,
                             train_overrides=train, sam_checkpoint=args.sam_checkpoint, intermediates=True,
                             overwrite=args.overwrite)
    print(sheet)
    return 0


def _check_run_training(prog: str, args, prompts: list[str], train: dict) -> None:
    """Refuse, before any work, what the training half of `lrkit run` would refuse later: its options (as the
    training config checks them) and prompts that name neither '{}' nor the concept's token."""
    from lrkit.training.config import load_config

    data = {"photos": args.photos, "class_word": args.class_word}
    if args.resolution is not None:
        data["resolution"] = args.resolution
    token = load_config({"method": args.method, "data": data}, **train).token
    missing = [p for p in prompts if "{}" not in p and token not in p]
    if missing:
        raise CommandLineError(prog, f"prompt {missing[0]!r} mentions neither '{{}}' (which becomes "
                                     f"'{token} {args.class_word}') nor the concept token {token!r}")


def _demo(argv: list[str]) -> int:
    from lrkit.demo import DEMO_PROMPTS, DEMO_SEEDS, DEMO_SUBJECT, run_demo
    from lrkit.toyworld.subjects import SUBJECTS

    parser = plain_argument_parser(
        prog="lrkit demo",
        description="Toy subject photos -> LoRA concept -> personalized and layout-retouch images, a grid PNG "
                    "and exact toy-world scores. Offline, CPU, a few minutes.")
    parser.add_argument("--out", default="outputs/demo", help="output folder (re-running reuses what is there)")
    parser.add_argument("--subject", default=DEMO_SUBJECT, choices=sorted(SUBJECTS), help="the toy subject")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"a prompt with '{{}}' for the subject (repeatable; default: {list(DEMO_PROMPTS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEMO_SEEDS), help="seeds")
    parser.add_argument("--max-steps", type=int, default=None, help="LoRA training steps (default: the toy recipe's)")
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        raise CommandLineError(parser.prog, f"--max-steps must be >= 1, got {args.max_steps}")
    train = {"max_steps": args.max_steps} if args.max_steps is not None else None
    result = run_demo(args.out, subject=args.subject, prompts=args.prompt or DEMO_PROMPTS, seeds=args.seeds,
                      train_overrides=train)
    print(result.summary())
    return 0


def _toyworld(argv: list[str]) -> int:
    parser = plain_argument_parser("lrkit toyworld", "The toy world's embedded base model.")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("pretrain", add_help=False,  # its own parser reads the rest (lrkit toyworld pretrain --help)
                   help="pretrain the toy base model on the toy world (time-budgeted, resumable)")
    args, rest = parser.parse_known_args(argv)
    return {"pretrain": _toyworld_pretrain}[args.action](rest)


def _toyworld_pretrain(argv: list[str]) -> int:
    from lrkit.toyworld.pretrain import parse_command_line, pretrain

    out, resume, config = parse_command_line(argv, "lrkit toyworld pretrain")
    print(pretrain(out, resume=resume, **config))
    return 0


def _ui(argv: list[str]) -> int:
    parser = plain_argument_parser("lrkit ui", "A local web app: train a concept from photos, generate "
                                   "(vanilla ... layout-retouch, dual-reference), manage bundles, evaluate (toy base).")
    parser.add_argument("--base", default="toy", help="base model: toy (offline), tiny-random, hub id, folder or "
                        ".safetensors (default: toy)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--root", default="lrkit-ui", help="data root: concepts/, uploads/, outputs/, jobs/ "
                        "(default ./lrkit-ui)")
    parser.add_argument("--device", default=None, help="device for generation and evaluation (default: cuda if "
                        "available, else cpu)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="ask for this user and password")
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CommandLineError(parser.prog, "the web app needs gradio: pip install 'lrkit[ui]'") from None
    from lrkit.ui.app import exposure_warning, launch, parse_auth

    try:
        auth = parse_auth(args.auth)
    except ValueError as err:
        raise CommandLineError(parser.prog, str(err)) from None
    warning = exposure_warning(args.host, args.share, auth)
    if warning:
        print(f"lrkit ui: {warning}", file=sys.stderr)
    launch(base=args.base, root=args.root, host=args.host, port=args.port, share=args.share, auth=auth,
           device=args.device)
    return 0


def _reference(argv: list[str]) -> int:
    from lrkit.reference import cli

    return cli(argv)


def _push(argv: list[str]) -> int:
    from lrkit.hub import cli

    return cli(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_train, "train a concept from photos (YAML config + overrides) and write its bundle"),
    "export": (_export, "write a concept bundle from a training checkpoint"),
    "reference": (_reference, "write a reference concept: a subject's photos, no training (dual-reference, retouch)"),
    "generate": (_generate, "generate images of a concept (vanilla | personalized | layout | layout-retouch | dual-reference)"),
    "run": (_run, "photos -> concept -> layout-retouch images + contact sheet, in one job"),
    "demo": (_demo, "toy subject photos -> LoRA concept -> layout-retouch grid, offline on a CPU in minutes"),
    "toyworld": (_toyworld, "toy world: `toyworld pretrain` trains the embedded toy base model"),
    "eval": (_eval, "benchmark modes x concepts x prompts x seeds: CLIP-I/T, DINO, layout diversity, table, plots"),
    "ui": (_ui, "a local web app (Gradio): train, generate, manage and evaluate concepts in the browser"),
    "push": (_push, "upload a concept bundle (weights, model card, reference photos) to the Hugging Face Hub"),
}


def _show_field_docstrings() -> None:
    """Have jsonargparse put the option dataclasses' field docstrings into `--help` (off by default in 4.x)."""
    import jsonargparse

    if hasattr(jsonargparse, "set_parsing_settings"):  # jsonargparse >= 4.35
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    else:
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)


VERBOSE_FLAGS = {"-v": 1, "--verbose": 1, "-vv": 2}
DEBUG_FLAG = "--debug"

USAGE = """usage: lrkit [-v | -vv] [--debug] COMMAND [options]   (lrkit COMMAND --help for its options)

  -v, --verbose  also show the INFO logging of third-party libraries (diffusers, transformers, ...)
                 and their console messages lrkit leaves out; -vv: DEBUG logging. Before or after COMMAND
  --debug        print the traceback of an error, not only its one-line message (also: LRKIT_DEBUG=1)"""


def _split_verbosity(argv: list[str]) -> tuple[list[str], int]:
    """`argv` without the -v / -vv / --verbose flags (before any `--`), and the verbosity they ask for."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [VERBOSE_FLAGS[a] for a in argv[:end] if a in VERBOSE_FLAGS]
    rest = [a for a in argv[:end] if a not in VERBOSE_FLAGS] + argv[end:]
    return rest, sum(flags)


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without `--debug` (before any `--`), and whether it asks for tracebacks (or LRKIT_DEBUG=1 does)."""
    end = argv.index("--") if "--" in argv else len(argv)
    rest = [a for a in argv[:end] if a != DEBUG_FLAG] + argv[end:]
    return rest, len(rest) < len(argv) or os.environ.get("LRKIT_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    from lrkit.logs import configure_console

    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    argv, verbosity = _split_verbosity(argv)
    configure_console(verbosity)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
        print(f"{USAGE}\n\ncommands:\n" + "\n".join(lines))
        return 0
    if argv[0] not in COMMANDS:
        match = suggest(argv[0], list(COMMANDS))
        hint = f"; did you mean {match}?" if match else ""
        print(f"lrkit: error: unknown command {argv[0]!r}{hint} (lrkit --help lists the commands)", file=sys.stderr)
        return 2
    command, _ = COMMANDS[argv[0]]
    _show_field_docstrings()
    try:
        return command(argv[1:])
    except CommandLineError as err:  # a refused option or value: code 2, as argparse exits
        print(f"{err.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lrkit {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        message = str(err) or type(err).__name__
        if is_user_error(err):
            print(f"lrkit {argv[0]}: error: {message}", file=sys.stderr)
            return 2
        hint = "" if debug else "; run with --debug for the traceback"
        print(f"lrkit {argv[0]}: error: unexpected {type(err).__name__}: {message} (a bug in lrkit{hint})",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
