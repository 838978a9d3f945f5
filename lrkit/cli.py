"""`lrkit` command line: one map from subcommands to library functions."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable


def _train(argv: list[str]) -> int:
    from lrkit.training import train_concept
    from lrkit.training.config import build_parser, config_from_namespace

    parser = build_parser("lrkit train", exit_on_error=True)
    namespace = parser.instantiate(parser.parse_args(argv))
    bundle = train_concept(config_from_namespace(namespace))
    print(bundle)
    return 0


def _export(argv: list[str]) -> int:
    from lrkit.training import export_checkpoint

    parser = argparse.ArgumentParser(prog="lrkit export", description="Write a concept bundle from a training checkpoint.")
    parser.add_argument("checkpoint", help="a checkpoint written by `lrkit train` (OUTPUT_DIR/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    parser.add_argument("--base", default=None, help="load the base model from here instead of the recorded id")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, base=args.base))
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_train, "train a concept from photos (YAML config + overrides) and write its bundle"),
    "export": (_export, "write a concept bundle from a training checkpoint"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: lrkit COMMAND [options]   (lrkit COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nlrkit: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, _ = COMMANDS[argv[0]]
    try:
        return command(argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"lrkit {argv[0]}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
