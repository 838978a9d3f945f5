"""Every runnable example in README.md and docs/*.md runs, in document order, as a user would run it.

Each document gets a fresh working directory that holds what a user's checkout holds
(`user_paths.make_checkout`: configs/ and data/prompts/ as shrunk copies, data/subjects, train/ and infer/ as
links), and its blocks run there one after the other, so later blocks use what earlier ones wrote (README
trains `outputs/my-dog/concept`, later blocks load it):

- `bash` blocks with `bash -e -o pipefail`, one subprocess each, the venv's `lrkit`, `torchrun` and
  `accelerate` first on PATH, HF_HUB_OFFLINE=1;
- `python` blocks in one python subprocess per document, each like `python block.py` in a fresh
  `__main__` namespace (`runpy.run_path`), so a document pays torch's and diffusers' imports once.

Documents are independent, so they run side by side, one per CPU core (each block is single-threaded).

What differs from the user's run, and only through the tables below:

- `SUBSTITUTIONS` (old text -> new text, with the reason) is applied to every block that runs. It swaps the
  base model for the built-in `tiny-random` (stock diffusers gets it as the folder `sd15`, saved there
  beforehand, which is README's own offline advice), the GPU for the CPU, the user's photos for
  data/subjects/vase, the CLIP and DINO models for tiny local ones, and makes runs small where a command
  takes sizes on its command line (steps, seeds, prompt counts, process counts). Commands with a config
  file keep their command line: their configs are already shrunk (`user_paths.SIZE_KEYS`).
  A whole line of a bash block is skipped only by an entry that replaces it with nothing.
  An entry that no longer changes any block fails the test, so the table cannot rot.
- `PREREQUISITES` (per document, python run before its first block): what the document assumes the
  user already has and does not make itself, made small and local: trained concepts (`my-concept/`,
  `outputs/my-ti/concept`, ...), a style image, `sam_vit_b_01ec64.pth` (a randomly initialised SAM ViT-B,
  `SamSegmenter.from_config`), the base model folder `sd15`, the tiny metric models.
- `NOT_RUN` (block id -> reason): blocks that cannot run here. A listed id that names no bash or python
  block fails the test; every other bash or python block runs.
- `PROMISES` (block id -> checks): what a block promises besides exiting 0, checked right after it: files
  the document says it writes, names a python block defines, words a command prints.

A block id is `<document>#<n> <first line>`, n counting every fenced block of the document from 1.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from launching import BIN, env
from user_paths import ROOT, make_checkout

DOCUMENTS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
LANGUAGES = ("bash", "python", "text", "json", "yaml")
RUNNABLE = ("bash", "python")
BLOCK_TIMEOUT = 300  # seconds; a block that hangs fails instead of stalling the suite


@dataclass(frozen=True)
class Block:
    """A fenced code block of a document."""

    document: str
    number: int  # 1-based, over every fenced block of the document
    language: str
    code: str

    @property
    def id(self) -> str:
        first = next((" ".join(line.split()) for line in self.code.splitlines() if line.strip()), "")
        short = first if len(first) <= 40 else first[:41].rsplit(" ", 1)[0]  # whole words, 40 characters at most
        return f"{self.document}#{self.number} {short}"


def read_blocks(document: str) -> list[Block]:
    """The document's fenced blocks, in order."""
    blocks, lines, i = [], (ROOT / document).read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^(`{3,}|~{3,})\s*([^`\s]*)", lines[i])
        i += 1
        if not opening:
            continue
        fence, body = opening.group(1), []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        blocks.append(Block(document, len(blocks) + 1, opening.group(2), "\n".join(body) + "\n"))
    return blocks


# ------------------------------------------------------------------------------------------------ the tables

SUBSTITUTIONS: list[tuple[str, str, str]] = [  # (old text, new text, why); applied in this order
    # Installing, and the test suite itself.
    ('pip install torch==2.14.1 torchvision==0.29.1 -e ".[test]" && ', "",
     "installed already: the test runs in that environment"),
    ("pip install -e .            # brings your CUDA torch if you have none; keep yours if you do\n", "",
     "installed already"),
    ("python -m pytest -q -n auto\n", "", "the test suite, which runs this file"),
    ("accelerate launch --num_processes 4 -m lrkit.cli eval ...   # each process takes a shard, merged once\n", "",
     "`...` stands for the options of the line above; the two-process eval is tests/test_evaluation_runner.py's"),
    # The base model, the device, the user's files, metric models.
    ('StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5"',
     'StableDiffusionPipeline.from_pretrained("sd15"',
     "stock diffusers loads a folder: tiny-random saved as `sd15`, README's offline download folder"),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tiny-random", "the base model"),
    ('StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0"',
     'StableDiffusionXLPipeline.from_pretrained("sdxl"', "stock diffusers loads a folder: tiny-random-xl saved as `sdxl`"),
    ('"cuda"', '"cpu"', "no GPU"),
    ("~/photos/my_dog", "data/subjects/vase", "the user's photos"),
    ('"photos/"', '"data/subjects/vase"', "the user's photos"),
    ("openai/clip-vit-base-patch32", "outputs/tiny_metrics/clip", "tiny local CLIP (save_tiny_metric_models)"),
    # Sizes, where a command takes them on its command line.
    ("lrkit demo\n", 'lrkit demo --max-steps 2 --seeds 0 --prompt "a photo of {} on the beach"\n',
     "the toy recipe's 1200 steps and 3 prompts x 4 seeds"),
    ('--seeds "[0,1,2,3]" --out outputs/vase',
     '--seeds "[0,1]" --out outputs/vase --max_steps 4 --resolution 64 --options.num_inference_steps 4',
     "seeds, training and denoising steps of `lrkit run` (it has no config)"),
    ("max_steps=200", "max_steps=4", "training steps"),
    ("--nproc_per_node 4", "--nproc_per_node 2", "two CPU processes"),
    ("--num_processes 4", "--num_processes 2", "two CPU processes"),
    ('pipe("a photo of sks dog on the beach")', 'pipe("a photo of sks dog on the beach", num_inference_steps=4)',
     "denoising steps"),
    ('in the snow").images[0]', 'in the snow", num_inference_steps=4).images[0]', "denoising steps"),
    ("seeds=[0, 1, 2, 3]", "seeds=[0]",
     "one seed: with SAM each image costs a ViT-B pass at 1024 px, about 40 s on a CPU core"),
    ("num_inference_steps=50", "num_inference_steps=4", "denoising steps"),
    ("--seeds 4 --out outputs/eval\n",
     "--seeds 2 --out outputs/eval --max_prompts 1 --options.num_inference_steps 4 "
     "--clip_model outputs/tiny_metrics/clip --dino_model outputs/tiny_metrics/dino\n",
     "seeds, prompts and denoising steps of `lrkit eval`; tiny local CLIP and DINO"),
    ("--seeds 4 --out outputs/eval_toy", "--seeds 2 --out outputs/eval_toy --max_prompts 1", "seeds and prompts"),
    ("--options.num_inference_steps 25", "--options.num_inference_steps 4", "denoising steps"),
    ("--options.dual_reference.style_subject ball\n", "--options.dual_reference.style_subject ball --options.num_inference_steps 4\n",
     "denoising steps"),
    ('style_subject="ball")', 'style_subject="ball", num_inference_steps=4)', "denoising steps"),
]

NOT_RUN: dict[str, str] = {
    "docs/evaluation.md#2 hf download openai/clip-vit-base-patch32":
        "`hf download` needs the Hub, and `lrkit eval ...` leaves its options out",
    "docs/evaluation.md#3 lrkit eval --base B --concepts DIR [DIR":
        "the synopsis of `lrkit eval`: B, DIR, SET, OUT, N and [...] are placeholders",
}

_MAKE_SD15 = 'lrkit.load_base("tiny-random").save_pretrained("sd15")  # README: hf download ... --local-dir sd15\n'
_MAKE_METRICS = 'save_tiny_metric_models("outputs/tiny_metrics")\n'
_MAKE_SDXL = 'lrkit.load_base("tiny-random-xl").save_pretrained("sdxl")  # stabilityai/stable-diffusion-xl-base-1.0\n'


def _train(config: str, output_dir: str, **options) -> str:
    extra = "".join(f", {key}={value!r}" for key, value in options.items())
    return f'lrkit.train_concept("configs/train/{config}.yaml", output_dir="{output_dir}"{extra})\n'


_HEADER = """\
import shutil
from pathlib import Path
import torch
from PIL import Image
import lrkit
from lrkit.evaluation.tiny import save_tiny_metric_models
from lrkit.masks import SamSegmenter
"""

PREREQUISITES: dict[str, str] = {  # document -> python run in its checkout before its first block
    "README.md": _MAKE_SD15 + _MAKE_SDXL + _MAKE_METRICS + (
        'torch.save(SamSegmenter.from_config("vit_b", seed=0).model.state_dict(), "sam_vit_b_01ec64.pth")\n'),
    "docs/concept-bundle.md": _MAKE_SD15
    + _train("lora", "outputs/my-dog", data={"photos": "data/subjects/vase", "class_word": "dog"})
    + _train("textual_inversion", "outputs/my-ti")
    + _train("dreambooth", "outputs/my-db")
    + _MAKE_SDXL + _train("sdxl_textual_inversion", "outputs/sdxl-ti"),
    "docs/dual-reference.md": _train("lora", "outputs/my-concept", base="toy") + (
        'Path("my-concept").symlink_to("outputs/my-concept/concept")\n'
        'Image.open("data/subjects/red_teapot/1.jpeg").convert("RGB").save("style.png")\n'),
    "docs/evaluation.md": _MAKE_METRICS + (
        'Path("out").mkdir(); Path("refs").mkdir()\n'
        'Image.open("data/subjects/vase/02.jpg").save("out/p000_s0.png")\n'
        'shutil.copy("data/subjects/vase/00.jpg", "refs/00.jpg")\n'
        'shutil.copy("data/subjects/vase/01.jpg", "refs/01.jpg")\n'
        'from lrkit.demo import run_demo  # what `lrkit demo` (README) leaves in outputs/demo, small\n'
        'run_demo("outputs/demo", prompts=["a photo of {} on the beach"], seeds=[0],\n'
        '         train_overrides={"max_steps": 2})\n'),
}


@dataclass
class Ran:
    """What a block left: its working directory, its output, and (python) the types of the names it defined."""

    cwd: Path
    output: str
    names: dict[str, str]


def writes(*patterns: str) -> Callable[[Ran], None]:
    """The block wrote a file matching each glob pattern (relative to the working directory)."""
    def check(ran: Ran) -> None:
        for pattern in patterns:
            assert sorted(ran.cwd.glob(pattern)), f"nothing matches {pattern!r} in the working directory"
    return check


def defines(name: str, type_name: str) -> Callable[[Ran], None]:
    """The python block defined `name` as an instance of `type_name` (its class's qualified name)."""
    def check(ran: Ran) -> None:
        assert ran.names.get(name) == type_name, f"{name} is {ran.names.get(name)}, not {type_name}"
    return check


def prints(text: str) -> Callable[[Ran], None]:
    """The block's output contains `text`."""
    def check(ran: Ran) -> None:
        assert text in ran.output, f"{text!r} is not in the output"
    return check


_STOCK_PIPELINE = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline"

PROMISES: dict[str, list[Callable[[Ran], None]]] = {
    "README.md#1 pip install torch==2.14.1": [writes("outputs/demo/demo_grid.png")],
    "README.md#2 lrkit run --photos data/subjects/vase":
        [writes("outputs/vase/images/p000_s0.png", "outputs/vase/images/p000_s1.png", "outputs/vase/contact_sheet.png",
                "outputs/vase/images/*_grid.png", "outputs/vase/images/*_layout.png",
                "outputs/vase/images/*_mask.png")],
    "README.md#3 pip install -e . # brings your CUDA":
        [writes("outputs/my-dog/concept/concept.json", "outputs/my-dog/concept/pytorch_lora_weights.safetensors",
                "outputs/my-dog/concept/my-dog.kohya.safetensors", "outputs/my-dog/validation/*.png")],
    "README.md#4 import torch": [defines("image", "PIL.Image.Image")],
    "README.md#5 import lrkit": [defines("pipe", _STOCK_PIPELINE)],
    "README.md#6 lrkit train --config":
        [writes("outputs/my-dog-xl/concept/concept.json", "outputs/my-dog-xl/concept/my-dog-xl.kohya.safetensors",
                "outputs/my-dog-xl/images/p000_s0.png", "outputs/my-dog-xl/images/p000_s0_grid.png")],
    "README.md#7 import torch": [defines("image", "PIL.Image.Image")],
    "README.md#8 lrkit train --config": [prints("rank: 8"), prints("max_steps: 400")],
    "README.md#9 import lrkit":
        [defines("bundle", "pathlib.PosixPath"), writes("outputs/lora-vase/concept/concept.json")],
    "README.md#10 torchrun --nproc_per_node 4":
        [writes("outputs/lora-torchrun/concept/concept.json", "outputs/lora-accelerate/concept/concept.json"),
         prints("rank 1/2 finished training")],
    "README.md#11 lrkit generate --base": [writes("outputs/dog-surf/p000_s0.png", "outputs/dog-surf/p000_s1.png")],
    "README.md#12 from lrkit import LayoutRetouchPipeline": [writes("dog.png"), defines("images", "builtins.list")],
    "README.md#13 lrkit eval --base":
        [writes("outputs/eval/results.csv", "outputs/eval/results.md", "outputs/eval/plots/*.png")],
    "docs/concept-bundle.md#3 import lrkit": [defines("image", "PIL.Image.Image")],
    "docs/concept-bundle.md#4 import torch": [defines("pipe", _STOCK_PIPELINE)],
    "docs/concept-em.md#1 lrkit train --config":
        [writes("outputs/em-vase-pot/concept/concept.json", "outputs/em-vase-pot/concept/learned_embeds.safetensors",
                "outputs/em-vase-pot/em/rounds.json", "outputs/em-vase-pot/em/round*/img*-*.png",
                "outputs/sdxl-em-vase-pot/concept/embeddings/red-vase.safetensors",
                "outputs/sdxl-em-vase-pot/concept/embeddings/black-pot.safetensors")],
    "docs/dual-reference.md#1 lrkit generate --concept my-concept/":
        [writes("outputs/generate/p000_s0.png", "outputs/generate/p000_s1.png")],
    "docs/dual-reference.md#2 from lrkit import LayoutRetouchPipeline": [defines("images", "builtins.list")],
    "docs/evaluation.md#1 from lrkit.evaluation import": [defines("scores", "torch.Tensor")],
    "docs/evaluation.md#5 python -c \"from lrkit.evaluation.tiny":
        [writes("outputs/tiny_metrics/clip/config.json", "outputs/eval_toy/results.csv",
                "outputs/eval_toy/results.md")],
}


# ------------------------------------------------------------------------------------------------ running

def substituted(block: Block) -> str:
    code = block.code
    for old, new, _ in SUBSTITUTIONS:
        code = code.replace(old, new)
    return code


def runnable_blocks(document: str) -> list[Block]:
    return [b for b in read_blocks(document) if b.language in RUNNABLE and b.id not in NOT_RUN]


def _environment() -> dict:
    return dict(env(), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _failed(what: str, code: str, output: str, why: str) -> str:
    return f"{what} failed ({why}):\n--- as run ---\n{code}\n--- output (tail) ---\n{output[-4000:]}"


def run_bash(code: str, cwd: Path, what: str) -> str:
    """`bash -e -o pipefail -c CODE` in CWD; its output, or an AssertionError with the tail of it."""
    try:
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=cwd, env=_environment(),
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        output = f"{err.stdout or ''}{err.stderr or ''}"
        raise AssertionError(_failed(what, code, output, f"still running after {BLOCK_TIMEOUT} s")) from None
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, _failed(what, code, output, f"exit {proc.returncode}")
    return output


# One python process per document runs its python blocks one after another, each like `python block.py`
# (`runpy.run_path`, a fresh `__main__` namespace), so imports are paid once per document, not per block.
# Block output goes to LOG; one JSON line per block on the original stdout says how it ended and, for
# `defines`, the type of every name it defined.
_PYTHON_SESSION = """\
import json, os, runpy, sys, traceback
replies = os.fdopen(os.dup(1), "w")
log = open(sys.argv[1], "a")
os.dup2(log.fileno(), 1)
os.dup2(log.fileno(), 2)
for script in sys.stdin:
    try:
        names = runpy.run_path(script.strip(), run_name="__main__")
        reply = {"names": {k: type(v).__module__ + "." + type(v).__qualname__
                           for k, v in names.items() if not k.startswith("_")}}
    except BaseException:
        reply = {"error": traceback.format_exc()}
    sys.stdout.flush()
    sys.stderr.flush()
    replies.write(json.dumps(reply) + "\\n")
    replies.flush()
"""


class PythonSession:
    """The python process that runs one document's python blocks (see `_PYTHON_SESSION`)."""

    def __init__(self, cwd: Path, scratch: Path):
        self.cwd, self.scratch, self.log = cwd, scratch, scratch / "python.log"
        self.log.touch()
        self.proc = subprocess.Popen([sys.executable, "-c", _PYTHON_SESSION, str(self.log)], cwd=cwd,
                                     env=_environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, code: str, name: str, what: str) -> tuple[str, dict[str, str]]:
        """Run CODE as the script NAME.py; (its output, {name: type}), or an AssertionError with its traceback."""
        script = self.scratch / f"{name}.py"
        script.write_text(code)
        start = self.log.stat().st_size
        self.proc.stdin.write(f"{script}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], BLOCK_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        with open(self.log, errors="replace") as log:
            log.seek(start)
            output = log.read()
        if not line:
            self.proc.kill()
            self.proc.wait()
            why = f"no reply in {BLOCK_TIMEOUT} s, or the process died"
            raise AssertionError(_failed(what, code, output, why))
        reply = json.loads(line)
        assert "error" not in reply, _failed(what, code, output + reply.get("error", ""), "an exception")
        return output, reply["names"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_document(document: str, root: Path) -> list[str]:
    """The document's prerequisites, then its blocks in order, each block's promises checked after it.
    Returns how long each took (`12 s README.md#3 ...`)."""
    cwd, scratch = make_checkout(root / "checkout"), root / "scratch"
    scratch.mkdir()
    python, timings = PythonSession(cwd, scratch), []
    try:
        if document in PREREQUISITES:
            started = time.monotonic()
            python.run(_HEADER + PREREQUISITES[document], "prerequisites", f"the prerequisites of {document}")
            timings.append(f"{time.monotonic() - started:4.0f} s  prerequisites of {document}")
        for block in runnable_blocks(document):
            started, code = time.monotonic(), substituted(block)
            if block.language == "bash":
                ran = Ran(cwd, run_bash(code, cwd, block.id), {})
            else:
                ran = Ran(cwd, *python.run(code, f"block{block.number}", block.id))
            timings.append(f"{time.monotonic() - started:4.0f} s  {block.id}")
            for check in PROMISES.get(block.id, []):
                try:
                    check(ran)
                except AssertionError as err:
                    raise AssertionError(f"{block.id} ran, but {err}") from None
    finally:
        python.close()
    return timings


# ------------------------------------------------------------------------------------------------ tests


def test_every_fenced_block_names_its_language():
    untagged = [b.id for d in DOCUMENTS for b in read_blocks(d) if b.language not in LANGUAGES]
    assert not untagged, f"tag these blocks with one of {LANGUAGES}: {untagged}"


def test_every_block_listed_in_not_run_is_a_bash_or_python_block():
    ids = {b.id for d in DOCUMENTS for b in read_blocks(d) if b.language in RUNNABLE}
    assert set(NOT_RUN) <= ids, f"NOT_RUN names no bash or python block: {sorted(set(NOT_RUN) - ids)}"


def test_every_substitution_changes_a_block_that_runs():
    codes = [b.code for d in DOCUMENTS for b in runnable_blocks(d)]
    for old, new, why in SUBSTITUTIONS:
        # Applied in order: an entry sees the blocks as the entries before it left them.
        assert any(old in code for code in codes), f"substitution {old!r} -> {new!r} ({why}) changes no block"
        codes = [code.replace(old, new) for code in codes]


def test_every_promise_belongs_to_a_block_that_runs():
    ids = {b.id for d in DOCUMENTS for b in runnable_blocks(d)}
    assert set(PROMISES) <= ids, f"PROMISES names no block that runs: {sorted(set(PROMISES) - ids)}"


def test_every_prerequisite_belongs_to_a_document_with_blocks_that_run():
    documents = {d for d in DOCUMENTS if runnable_blocks(d)}
    unknown = sorted(set(PREREQUISITES) - documents)
    assert not unknown, f"PREREQUISITES of documents that have no block to run: {unknown}"


_DOCUMENT_TEST = "test_examples_of_the_document_run_as_written"


@pytest.fixture(scope="session")
def document_runs(request, tmp_path_factory):
    """document -> the Future of its `run_document`, for every document this session tests.

    Documents are independent and each block is one single-threaded process, so the documents run side by
    side, as many at a time as there are CPU cores; the longest (README.md) starts first.
    """
    chosen = [item.callspec.params["document"] for item in request.session.items
              if getattr(item, "originalname", None) == _DOCUMENT_TEST]
    chosen.sort(key=lambda d: -len(runnable_blocks(d)))
    roots = {d: tmp_path_factory.mktemp(Path(d).stem) for d in chosen}
    with ThreadPoolExecutor(max_workers=max(1, min(len(chosen), os.cpu_count() or 1))) as pool:
        yield {d: pool.submit(run_document, d, roots[d]) for d in chosen}
        pool.shutdown(cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("document", [d for d in DOCUMENTS if runnable_blocks(d)])
def test_examples_of_the_document_run_as_written(document, document_runs):
    for line in document_runs[document].result():
        print(line)  # shown with -rP: where the time goes
