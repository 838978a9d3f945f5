"""Train a concept: `python train/train.py --config configs/train/lora.yaml [overrides]`.

Also under launchers: `accelerate launch --multi_gpu --num_processes 2 train/train.py ...` or
`torchrun --nproc_per_node 2 train/train.py ...` (Lightning reads their environment).
"""

import sys

from lrkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
