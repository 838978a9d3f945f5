"""Generate images of a concept: `python infer/generate.py --concept DIR --prompt "a photo of {} on the beach"`."""

import sys

from lrkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
