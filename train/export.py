"""Write a concept bundle from a checkpoint: `python train/export.py CKPT --out DIR`."""

import sys

from lrkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
