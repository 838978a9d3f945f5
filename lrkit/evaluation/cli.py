"""`lrkit eval`: generate, score and tabulate methods x concepts x prompts x seeds (see `runner`)."""

from __future__ import annotations


def parse_seeds(text: str) -> list[int]:
    """`4` -> [0, 1, 2, 3]; `0,5,7` or `[0,5,7]` -> that list (each seed once)."""
    body = str(text).strip().strip("[]")
    try:
        if "," in body:
            seeds = [int(s) for s in body.split(",") if s.strip()]
        else:
            seeds = list(range(int(body)))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give a count N (seeds 0..N-1) or a list such as 0,5,7") from None
    if not seeds:
        raise ValueError(f"--seeds {text!r}: the count must be >= 1")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"--seeds {text!r} lists {twice} more than once; give each seed once")
    return seeds


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in str(text).split(",") if s.strip()]


def build_parser():
    from jsonargparse import ActionConfigFile

    from lrkit.argparsing import argument_parser
    from lrkit.evaluation.metrics import DEFAULT_CLIP, DEFAULT_DINO
    from lrkit.evaluation.runner import DEFAULT_METHODS, MASK_SOURCES
    from lrkit.inference import GenerationOptions
    from lrkit.inference.options import MODES, moved_keys

    parser = argument_parser("lrkit eval", default_meta=False, moved_keys=moved_keys(), description=(
        "Benchmark generation modes on concepts: images (resumable), CLIP-I / CLIP-T / DINO, layout diversity, "
        "toy-world scores on --base toy; writes OUT/results.csv, OUT/results.md and OUT/plots/. "
        "Under `accelerate launch` / `torchrun` the processes share the work."))
    parser.add_argument("--config", action=ActionConfigFile, help="options YAML")
    parser.add_argument("--base", default=None, help="base model: tiny-random, toy, hub id, folder or .safetensors "
                        "(default: the base the concepts record)")
    parser.add_argument("--concepts", nargs="+", required=True, help="concept bundle folders")
    parser.add_argument("--prompts", default="dreambench",
                        help="prompt set: dreambench | vico | dreammatcher (live or non-live list by class word), a file "
                             "stem in data/prompts (e.g. dreambench_objects), toy, or a prompt file")
    parser.add_argument("--max_prompts", type=int | None, default=None, help="only the first N prompts of the set")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--seeds", default="4", help="a count N (seeds 0..N-1) or a list such as 0,5,7")
    parser.add_argument("--out", required=True, help="output folder (re-running resumes)")
    parser.add_argument("--clip_model", default=DEFAULT_CLIP, help="CLIP hub id or local folder; 'none' skips CLIP-I/T")
    parser.add_argument("--dino_model", default=DEFAULT_DINO, help="DINO hub id or local folder; 'none' skips DINO")
    parser.add_argument("--masks", default="auto", choices=list(MASK_SOURCES),
                        help="subject masks for the layout centres (auto: toy on --base toy, sam with a checkpoint, "
                             "else the layout-retouch attention masks)")
    parser.add_argument("--sam_checkpoint", default=None, help="SAM checkpoint (sam_vit_b/l/h_*.pth)")
    parser.add_argument("--toy_subjects", default=None, help="--base toy: comma-separated toy subject per concept")
    parser.add_argument("--device", default=None, help="device (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="base-model dtype: float32 | float16 | bfloat16")
    parser.add_argument("--metric_dtype", default=None, help="metric-model dtype: float32 | float16 | bfloat16")
    parser.add_argument("--batch_size", type=int, default=32, help="images per metric-model batch")
    parser.add_argument("--allow_pickle", type=bool, default=False,
                        help="let metric models load pytorch_model.bin (weights_only) when no safetensors exist")
    parser.add_argument("--force", type=bool, default=False, help="apply concepts even to another base model")
    parser.add_class_arguments(GenerationOptions, "options", skip={"mode"})
    return parser


def config_from_args(argv: list[str]):
    """The `EvalConfig` of a command line."""
    from lrkit.evaluation.runner import EvalConfig

    parser = build_parser()
    args = parser.instantiate(parser.parse_args(argv))
    return EvalConfig(
        concepts=list(args.concepts), out=args.out, base=args.base, prompts=args.prompts, methods=_names(args.methods),
        seeds=parse_seeds(args.seeds), max_prompts=args.max_prompts, options=args.options,
        clip_model=args.clip_model, dino_model=args.dino_model, masks=args.masks, sam_checkpoint=args.sam_checkpoint,
        toy_subjects=_names(args.toy_subjects), device=args.device, dtype=args.dtype, metric_dtype=args.metric_dtype,
        batch_size=args.batch_size, allow_pickle=args.allow_pickle, force=args.force)


def main(argv: list[str]) -> int:
    """`lrkit eval ...`; prints the results table (process 0 only)."""
    from lrkit.evaluation.runner import run_eval

    result = run_eval(config_from_args(argv))
    if result.table is not None:
        print(result.markdown)
        print(result.table)
    return 0


__all__ = ["build_parser", "config_from_args", "main", "parse_seeds"]
