"""Photos -> concept -> Layout-and-Retouch images:
`python infer/photos_to_images.py --photos DIR --class_word dog --prompts data/prompts/dreambench_live.txt`."""

import sys

from lrkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
