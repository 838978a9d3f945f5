"""The benchmark runner: methods x concepts x prompts x seeds -> images, scores, CSV, table, plots (DESIGN §8).

Work is cut into *units*, one per (concept, method, prompt): the unit generates its images (one
per seed; complete images already in OUT are kept, see `lrkit.jobs.generate_to_folder`) and writes its scores to
`OUT/scores/<concept>/<method>/p<prompt>.json` in one atomic write. A unit whose score file is
there (for the same prompt, seeds and metrics) is not redone, so a killed run restarts where it
stopped and every row ends up in the results exactly once. The results are assembled from the
score files at the end.

Under `accelerate launch` or `torchrun` (WORLD_SIZE > 1) process r takes units r, r + W,
r + 2W, ... of the fixed unit order; after a barrier (gloo process group), process 0 merges the
score files once. Each unit is generated and scored as one batch in either case, so one process
and several give the same numbers.

Layout outputs: `OUT/images/<concept>/<method>/p{prompt:03d}_s{seed}.png`, `OUT/results.csv` (one
row per image), `OUT/prompts.csv` (one row per prompt: sigma^2 of the centres, DINO diversity),
`OUT/results.md` (tables), `OUT/plots/` (a bar chart per metric, a centre heatmap per method) and
`OUT/run.json` (the settings that decide the images; resuming with other ones is refused). Each image folder
holds a `job.json` and a record per image (`lrkit.jobs`): resuming with other prompts at the same index or a
changed concept bundle is refused too, so images are never scored under prompts they were not made from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import PIL.Image
from tqdm.auto import tqdm

from lrkit.concept import Concept, check_name, recorded_base, recorded_base_error
from lrkit.evaluation import report
from lrkit.evaluation.metrics import (DEFAULT_CLIP, DEFAULT_DINO, ClipEmbedder, DinoEmbedder, mask_center,
                                      pairwise_diversity, reference_similarity, text_similarity)
from lrkit.evaluation.prompts import load_prompt_set
from lrkit.inference.outputs import image_path
from lrkit.inference.options import MODES, GenerationOptions
from lrkit.io import atomic_write_json, atomic_write_text
from lrkit.jobs import check_generation_folder, fill_prompts, generate_to_folder, generation_inputs, incomplete_units

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("vanilla", "personalized", "layout", "layout-retouch")
MASK_SOURCES = ("auto", "toy", "attention", "sam", "none")
RUN_FILE = "run.json"
SCORES_FORMAT = "lrkit.eval-scores/1"


class EvalError(ValueError):
    """Bad benchmark input; the message names the option or file."""


@dataclass
class EvalConfig:
    """What `lrkit eval` runs (one field per CLI option)."""

    concepts: list[str]
    """Concept bundle folders."""
    out: str
    """Output folder; re-running with the same folder resumes."""
    base: str | None = None
    """Base model: tiny-random, toy, hub id, folder or .safetensors (as `lrkit generate --base`); default: the
    base the concepts record (they must agree)."""
    prompts: str = "dreambench"
    """Prompt set (dreambench, vico, dreammatcher, a file stem in data/prompts, toy) or a prompt file."""
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """Generation modes to compare (`GenerationOptions.mode` values; default: vanilla, personalized, layout,
    layout-retouch)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Seeds per prompt."""
    max_prompts: int | None = None
    """Use only the first this many prompts of the set."""
    options: GenerationOptions = field(default_factory=GenerationOptions)
    """Generation options (the mode is set per method)."""
    clip_model: str | None = DEFAULT_CLIP
    """CLIP model (hub id or local folder) for CLIP-I and CLIP-T; None skips them."""
    dino_model: str | None = DEFAULT_DINO
    """DINO model (hub id or local folder) for DINO and DINO diversity; None skips them."""
    masks: str = "auto"
    """Subject masks for the centre points: auto | toy | attention | sam | none (auto: toy on the toy base,
    else sam with a checkpoint, else attention: the layout-retouch target masks)."""
    sam_checkpoint: str | None = None
    """SAM checkpoint for `masks: sam` (and for the layout-retouch pipeline)."""
    toy_subjects: list[str] | None = None
    """Toy base: the toy subject of each concept, in --concepts order (default: the concept's name, if it is one)."""
    device: str | None = None
    """Device for generation and metrics (default: cuda:LOCAL_RANK if available, else cpu)."""
    dtype: str | None = None
    """Base-model dtype (float32, float16, bfloat16); default float32."""
    metric_dtype: str | None = None
    """Metric-model dtype; default float32."""
    batch_size: int = 32
    """Images per metric-model batch."""
    allow_pickle: bool = False
    """Let metric models load pytorch_model.bin (torch.load with weights_only=True) when no safetensors exist."""
    force: bool = False
    """Apply concepts even to a base model they were not trained on."""
    base_recorded: bool = field(default=False, init=False, repr=False)
    """Whether `base` was read from the concepts (a load failure then says to pass --base)."""

    def __post_init__(self) -> None:
        if not self.concepts:
            raise EvalError("give at least one concept folder (--concepts DIR [DIR ...])")
        bad = [m for m in self.methods if m not in MODES]
        if bad or not self.methods:
            raise EvalError(f"--methods {bad or self.methods} must be a non-empty list of {list(MODES)}")
        if len(set(self.methods)) != len(self.methods):
            raise EvalError(f"--methods lists a method twice: {self.methods}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise EvalError(f"--seeds must be distinct and non-empty, got {self.seeds}")
        if self.masks not in MASK_SOURCES:
            raise EvalError(f"--masks {self.masks!r} is not one of {list(MASK_SOURCES)}")
        if self.masks == "sam" and not self.sam_checkpoint:
            raise EvalError("--masks sam needs --sam_checkpoint PATH (sam_vit_b/l/h_*.pth)")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise EvalError(f"--max_prompts must be >= 1, got {self.max_prompts}")
        if self.toy_subjects is not None and len(self.toy_subjects) != len(self.concepts):
            raise EvalError(f"--toy_subjects names {len(self.toy_subjects)} subjects for {len(self.concepts)} concepts; "
                            "give one per concept, in --concepts order")
        if self.batch_size < 1:
            raise EvalError(f"--batch_size must be >= 1, got {self.batch_size}")
        self.base_recorded = self.base is None
        if self.base_recorded:
            self.base = recorded_base([Concept.load(c) for c in self.concepts])
        self.clip_model = None if str(self.clip_model).lower() == "none" else self.clip_model
        self.dino_model = None if str(self.dino_model).lower() == "none" else self.dino_model

    @property
    def is_toy(self) -> bool:
        return self.base.split(":")[0] == "toy"

    def mask_source(self) -> str:
        if self.masks != "auto":
            return self.masks
        if self.is_toy:
            return "toy"
        return "sam" if self.sam_checkpoint else "attention"

    def generation_settings(self) -> dict:
        """What decides the images (resuming into OUT with other values is refused)."""
        options = {k: v for k, v in dataclasses.asdict(self.options).items() if k != "mode"}
        return json.loads(json.dumps({"base": self.base, "dtype": self.dtype, "options": options}, default=str))


@dataclass(frozen=True)
class Unit:
    """One (concept, method, prompt): its seeds are generated and scored together."""

    concept: int
    method: str
    prompt_index: int


@dataclass
class EvalResult:
    """Where the merged results were written (only on process 0; None elsewhere)."""

    out: Path
    csv: Path | None = None
    table: Path | None = None
    plots: list[Path] = field(default_factory=list)
    markdown: str = ""


# ------------------------------------------------------------------------------------ processes


@contextlib.contextmanager
def process_group(timeout_hours: float = 24.0):
    """(rank, world size): a gloo process group when launched with WORLD_SIZE > 1 (torchrun, accelerate).

    gloo, not nccl, even on GPUs: the group only carries barriers.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=timedelta(hours=timeout_hours))
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if created:
            dist.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _default_device(device: str | None) -> str:
    import torch

    if device is not None:
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


# ------------------------------------------------------------------------------------ per concept


def plain_prompt(prompt: str, concept: Concept) -> str:
    """The prompt CLIP-T reads: the concept phrase (or bare token) replaced by the class word."""
    return prompt.replace(concept.subject_phrase(), concept.class_word).replace(concept.token, concept.class_word)


class _ConceptJob:
    """One concept's prompts, reference embeddings and (lazily) its pipeline, for one process."""

    def __init__(self, index: int, path: str, config: EvalConfig):
        self.index = index
        self.config = config
        self.concept = Concept.load(path)
        set_name, raw = load_prompt_set(config.prompts, self.concept.class_word)
        raw = raw[: config.max_prompts] if config.max_prompts else raw
        self.set_name = set_name
        self.prompts = fill_prompts(raw, self.concept)
        self.plain = [plain_prompt(p, self.concept) for p in self.prompts]
        self.subject = self._toy_subject() if config.is_toy else None
        self._pipeline = None
        self._refs: dict[str, object] = {}

    @property
    def name(self) -> str:
        """The concept's name, checked to be a concept name (`lrkit.concept.NAME_RE`: no separator, no `..`),
        so it is one safe folder name under images/ and scores/."""
        return check_name(self.concept.name, str(self.concept.path))

    def _toy_subject(self):
        from lrkit.toyworld.subjects import SUBJECTS

        name = self.config.toy_subjects[self.index] if self.config.toy_subjects else self.concept.name
        if name in SUBJECTS:
            return SUBJECTS[name]
        if self.config.toy_subjects:
            raise EvalError(f"--toy_subjects: {name!r} is not one of {sorted(SUBJECTS)}")
        logger.warning("concept %r is not named after a toy subject; identity is not scored "
                       "(name its subject with --toy_subjects, one of %s)", self.name, sorted(SUBJECTS))
        return None

    def pipeline(self, device: str):
        if self._pipeline is None:
            from lrkit.inference import LayoutRetouchPipeline

            from lrkit.models import BaseModelError

            sam = self.config.sam_checkpoint
            try:
                self._pipeline = LayoutRetouchPipeline.from_concept(
                    self.config.base, self.concept, dtype=self.config.dtype, device=device, sam_checkpoint=sam,
                    force=self.config.force, cache_dir=Path(self.config.out) / "cache")
            except BaseModelError as err:
                if not self.config.base_recorded:
                    raise
                raise recorded_base_error(err, self.config.base) from err
        return self._pipeline

    def references(self, key: str, embedder):
        """Embeddings of the concept's reference photos (None when the bundle has none)."""
        if key not in self._refs:
            paths = self.concept.ref_paths()
            if not paths:
                logger.warning("concept %r has no reference photos (refs/ in its bundle): no CLIP-I or DINO", self.name)
            self._refs[key] = embedder.embed_images(paths) if paths else None
        return self._refs[key]


# ------------------------------------------------------------------------------------ the runner


class Runner:
    """Runs an `EvalConfig`: plans the units, does this process's share, merges on process 0."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self.out = Path(config.out)
        self.jobs = [_ConceptJob(i, p, config) for i, p in enumerate(config.concepts)]
        names = [j.name for j in self.jobs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise EvalError(f"--concepts: several bundles are named {dupes}; their results would share a folder")
        self.mask_source = config.mask_source()
        self._clip = self._dino = self._segmenter = None
        self.device = _default_device(config.device)

    # -------------------------------------------------------------- plan

    def units(self) -> list[Unit]:
        """Every unit, in the fixed order concept, method, prompt."""
        return [Unit(j.index, m, i) for j in self.jobs for m in self.config.methods for i in range(len(j.prompts))]

    def image_dir(self, unit: Unit) -> Path:
        return self.out / "images" / self.jobs[unit.concept].name / unit.method

    def score_file(self, unit: Unit) -> Path:
        return self.out / "scores" / self.jobs[unit.concept].name / unit.method / f"p{unit.prompt_index:03d}.json"

    def signature(self, unit: Unit) -> dict:
        """What a unit's score file must match to be reused."""
        job = self.jobs[unit.concept]
        return {"format": SCORES_FORMAT, "prompt": job.prompts[unit.prompt_index], "seeds": list(self.config.seeds),
                "clip_model": self.config.clip_model, "dino_model": self.config.dino_model,
                "masks": self.mask_source, "toy_subject": job.subject.name if job.subject else None}

    def is_done(self, unit: Unit) -> bool:
        path = self.score_file(unit)
        if not path.is_file():
            return False
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("signature") == self.signature(unit)
        except (json.JSONDecodeError, OSError):
            return False

    def check_settings(self) -> None:
        """Refuse to resume into an OUT whose images were made with other generation settings."""
        path = self.out / RUN_FILE
        if not path.is_file():
            return
        recorded = json.loads(path.read_text(encoding="utf-8")).get("generation")
        current = self.config.generation_settings()
        if recorded != current:
            diff = sorted(k for k in set(recorded or {}) | set(current) if (recorded or {}).get(k) != current.get(k))
            raise EvalError(f"--out {str(self.out)!r} holds images made with other generation settings (differ in "
                            f"{diff}; see {path}); use a new --out, or delete that folder to start over")

    def method_options(self, method: str) -> GenerationOptions:
        return dataclasses.replace(self.config.options, mode=method)

    def generation_inputs(self, job: _ConceptJob) -> dict:
        """What besides the options, prompt and seed decides a job's images (the concept's files included)."""
        return generation_inputs(job.concept, self.config.base, dtype=self.config.dtype,
                                 sam_checkpoint=self.config.sam_checkpoint)

    def intermediates(self, method: str) -> bool:
        """Whether a method's images keep their intermediates (the attention masks the centres come from)."""
        return self.mask_source == "attention" and method == "layout-retouch"

    def check_images(self) -> None:
        """Refuse, before any work, image folders holding images of other prompts or another concept bundle."""
        for job in self.jobs:
            for method in self.config.methods:
                folder = self.image_dir(Unit(job.index, method, 0))
                check_generation_folder(folder, job.prompts, self.method_options(method), self.generation_inputs(job),
                                        fix=f"use a new --out, or delete {folder} to start over")

    # -------------------------------------------------------------- metric models

    def clip(self):
        if self._clip is None and self.config.clip_model:
            self._clip = ClipEmbedder.from_pretrained(self.config.clip_model, device=self.device,
                                                      dtype=self.config.metric_dtype, batch_size=self.config.batch_size,
                                                      allow_pickle=self.config.allow_pickle)
        return self._clip

    def dino(self):
        if self._dino is None and self.config.dino_model:
            self._dino = DinoEmbedder.from_pretrained(self.config.dino_model, device=self.device,
                                                      dtype=self.config.metric_dtype, batch_size=self.config.batch_size,
                                                      allow_pickle=self.config.allow_pickle)
        return self._dino

    def segmenter(self):
        if self._segmenter is None:
            from lrkit.masks import load_segmenter

            self._segmenter = load_segmenter(self.config.sam_checkpoint, device=self.device)
        return self._segmenter

    # -------------------------------------------------------------- run

    def run(self, rank: int = 0, world: int = 1) -> EvalResult:
        """Do units rank, rank + world, ...; then (after a barrier) process 0 merges everything."""
        self.check_settings()
        self.check_images()
        # Load the metric models before generating, so a missing one fails in seconds, not after hours.
        self.clip()
        self.dino()
        units = self.units()
        mine = [u for u in units[rank::world] if not self.is_done(u)]
        logger.info("process %d/%d: %d of %d units to do (%d already scored)", rank, world, len(mine),
                    len(units[rank::world]), len(units[rank::world]) - len(mine))
        if rank == 0:
            atomic_write_json(self.out / RUN_FILE, {"generation": self.config.generation_settings(),
                                                    "prompt_set": sorted({j.set_name for j in self.jobs})})
        for job in self.jobs:
            for method in self.config.methods:
                group = [u for u in mine if u.concept == job.index and u.method == method]
                if group:
                    self._run_group(job, method, group)
        _barrier(world)
        result = self.merge(units) if rank == 0 else EvalResult(self.out)
        _barrier(world)
        return result

    def _run_group(self, job: _ConceptJob, method: str, group: list[Unit]) -> None:
        options = self.method_options(method)
        intermediates = self.intermediates(method)
        indices = [u.prompt_index for u in group]
        logger.info("%s / %s: %d prompts x %d seeds", job.name, method, len(indices), len(self.config.seeds))
        folder, seeds, inputs = self.image_dir(group[0]), list(self.config.seeds), self.generation_inputs(job)
        if incomplete_units(folder, job.prompts, seeds, options, inputs, indices=indices, intermediates=intermediates):
            generate_to_folder(job.pipeline(self.device), job.prompts, seeds, folder, options,
                               intermediates=intermediates, indices=indices, inputs=inputs)
        for unit in tqdm(group, desc=f"scoring {job.name}/{method}", unit="prompt", disable=len(group) < 2):
            rows, prompt_row = self.score_unit(job, unit)
            atomic_write_json(self.score_file(unit), {"signature": self.signature(unit), "images": rows,
                                                      "prompt": prompt_row})

    # -------------------------------------------------------------- scoring

    def score_unit(self, job: _ConceptJob, unit: Unit) -> tuple[list[dict], dict]:
        """Per-image rows and the per-prompt row of one unit (all its seeds in one batch)."""
        seeds = list(self.config.seeds)
        folder = self.image_dir(unit)
        paths = [image_path(folder, unit.prompt_index, s) for s in seeds]
        images = []
        for path in paths:
            with PIL.Image.open(path) as image:
                images.append(image.convert("RGB"))
        prompt, plain = job.prompts[unit.prompt_index], job.plain[unit.prompt_index]
        rows = [{"concept": job.name, "method": unit.method, "prompt_index": unit.prompt_index, "seed": s,
                 "prompt": prompt, "image": p.relative_to(self.out).as_posix()} for s, p in zip(seeds, paths)]
        prompt_row = {"concept": job.name, "method": unit.method, "prompt_index": unit.prompt_index, "prompt": prompt,
                      "layout_var": None, "dino_diversity": None}
        if (clip := self.clip()) is not None:
            embeds = clip.embed_images(images)
            text = clip.embed_texts([plain]).expand(len(images), -1)
            _put(rows, "clip_t", text_similarity(embeds, text))
            refs = job.references("clip", clip)
            if refs is not None:
                _put(rows, "clip_i", reference_similarity(embeds, refs))
        if (dino := self.dino()) is not None:
            embeds = dino.embed_images(images)
            refs = job.references("dino", dino)
            if refs is not None:
                _put(rows, "dino", reference_similarity(embeds, refs))
            prompt_row["dino_diversity"] = pairwise_diversity(embeds)
        if self.config.is_toy:
            self._score_toy(job, plain, images, rows)
        if self.mask_source != "toy":
            for row, image, seed in zip(rows, images, seeds):
                center = self._center(folder, unit.prompt_index, seed, image)
                row["center_x"], row["center_y"] = center if center else (None, None)
        centers = [(r["center_x"], r["center_y"]) for r in rows if r.get("center_x") is not None]
        if len(centers) >= 2:
            c = np.asarray(centers, dtype=np.float64)  # (seeds with a subject, xy)
            prompt_row["layout_var"] = float(c[:, 0].var() + c[:, 1].var())
        prompt_row["centers"] = len(centers)
        return rows, prompt_row

    def _score_toy(self, job: _ConceptJob, plain: str, images, rows: list[dict]) -> None:
        """The toy world's exact scorers: scene, subject identity, centre and scale of the segmented object."""
        from lrkit.toyworld.scorers import score_image
        from lrkit.toyworld.world import scene_of

        scene = scene_of(plain)
        for row, image in zip(rows, images):
            record = score_image(image, job.subject, scene)
            row["scene"] = record["scene"]
            row["scene_ok"] = record.get("scene_ok")
            row["identity"] = record.get("identity")
            row["is_subject"] = record.get("is_subject")
            row["scale"] = record["scale"]
            if self.mask_source == "toy":
                row["center_x"], row["center_y"] = record["center"] if record["center"] else (None, None)

    def _center(self, folder: Path, index: int, seed: int, image: PIL.Image.Image) -> tuple[float, float] | None:
        if self.mask_source == "attention":
            mask_file = image_path(folder, index, seed, "mask")
            if not mask_file.is_file():
                return None
            with PIL.Image.open(mask_file) as mask:
                return mask_center(mask)
        if self.mask_source == "sam":
            return mask_center(self.segmenter()(image))
        if self.mask_source == "toy":
            from lrkit.toyworld.scorers import segment_object

            return mask_center(segment_object(image))
        return None

    # -------------------------------------------------------------- merge

    def merge(self, units: list[Unit]) -> EvalResult:
        """Read every unit's score file (in unit order) and write the CSVs, the table and the plots."""
        image_rows: list[dict] = []
        prompt_rows: list[dict] = []
        for unit in units:
            path = self.score_file(unit)
            if not self.is_done(unit):
                raise EvalError(f"score file {path} is missing or stale after every process finished; re-run to redo it")
            data = json.loads(path.read_text(encoding="utf-8"))
            image_rows += data["images"]
            prompt_rows.append(data["prompt"])
        csv_path = report.write_csv(self.out / "results.csv", image_rows, report.IMAGE_COLUMNS)
        report.write_csv(self.out / "prompts.csv", prompt_rows, report.PROMPT_COLUMNS)
        by_method = report.summarize(image_rows, prompt_rows, ("method",))
        by_concept = report.summarize(image_rows, prompt_rows, ("concept", "method"))
        markdown = "\n".join([
            f"# lrkit eval: {', '.join(sorted({j.set_name for j in self.jobs}))} on {self.config.base}", "",
            f"{len(self.jobs)} concept(s), {len(self.config.seeds)} seed(s), "
            f"{self.config.options.num_inference_steps} steps; centres from {self.mask_source} masks.", "",
            "## By method", "", report.markdown_table(by_method, ("method",)), "",
            "## By concept and method", "", report.markdown_table(by_concept, ("concept", "method")), "",
        ])
        table = atomic_write_text(self.out / "results.md", markdown)
        plots = []
        labels = [s["method"] for s in by_method]
        for column, _, _ in report.TABLE:
            values = [s[column] for s in by_method]
            if any(not math.isnan(v) for v in values):
                plots.append(report.bar_chart(column, labels, values, self.out / "plots" / f"{_slug(column)}.png"))
        for method in self.config.methods:
            centers = [(r["center_x"], r["center_y"]) for r in image_rows
                       if r["method"] == method and r.get("center_x") is not None]
            plots.append(report.center_heatmap(f"centres: {method}", centers,
                                               self.out / "plots" / f"centers_{_slug(method)}.png"))
        logger.info("results: %s, %s", csv_path, table)
        return EvalResult(self.out, csv=csv_path, table=table, plots=plots, markdown=markdown)


def _put(rows: list[dict], key: str, values) -> None:
    for row, value in zip(rows, values.tolist()):
        row[key] = float(value)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def run_eval(config: EvalConfig) -> EvalResult:
    """Run the benchmark in this process, or this process's share under torchrun / accelerate launch."""
    with process_group() as (rank, world):
        return Runner(config).run(rank, world)


__all__ = ["DEFAULT_METHODS", "EvalConfig", "EvalError", "EvalResult", "MASK_SOURCES", "Runner", "Unit", "plain_prompt", "process_group",
           "run_eval"]
