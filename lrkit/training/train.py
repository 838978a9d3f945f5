"""`train_concept`: config -> Lightning run -> concept bundle. And export from a checkpoint.

The CLI (`lrkit train`, `lrkit export`), the scripts in train/ and the Python API call these. A run holds
OUTPUT_DIR's lock, resumes only a checkpoint trained from the same inputs, and appends to its metrics
(`lrkit.training.folder`); nothing with NaN or infinite weights is saved or exported.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch

from lrkit.concept import Concept, write_bundle, write_refs
from lrkit.logs import dropped
from lrkit.models import builtin_kind
from lrkit.photos import load_images
from lrkit.runtime import cpu_threads_for
from lrkit.training.config import TrainConfig, config_from_dict, load_config
from lrkit.training.folder import (InputsRecord, MetricsLogger, base_record, check_resume, folder_lock,
                                   read_checkpoint, training_inputs, write_record)
from lrkit.training.model import ConceptModel
from lrkit.training.module import (AtomicCheckpointIO, ConceptDataModule, PersonalizationModule, StepProgressBar,
                                   ValidationImages, raise_if_nonfinite, world_from_environment)
from lrkit.version import __version__

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"


def _resume_path(config: TrainConfig) -> str | None:
    if config.resume in (None, "", "none", "None"):
        return None
    if config.resume == "auto":
        last = config.checkpoint_dir / LAST_CHECKPOINT
        return str(last) if last.is_file() else None
    path = Path(config.resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint {config.resume!r} does not exist")
    return str(path)


def build_trainer(config: TrainConfig, extra_callbacks: "list | tuple" = (), *, resume_step: int | None = None,
                  **trainer_kwargs) -> L.Trainer:
    """The Lightning trainer of `config`; `resume_step` (a resume from that step) keeps the rows of the earlier
    steps in logs/metrics.csv."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=config.checkpoint_dir, filename="last", save_top_k=1, monitor=None,
                                 every_n_epochs=config.checkpoint_every_n_epochs, save_on_train_epoch_end=True,
                                 enable_version_counter=False)
    kwargs = dict(
        max_steps=config.max_steps, max_epochs=-1, precision=config.precision, accelerator=config.accelerator,
        devices=world_from_environment(config.devices), num_nodes=config.num_nodes, strategy=config.strategy,
        callbacks=[checkpoint, ValidationImages(config), *extra_callbacks], plugins=[AtomicCheckpointIO()],
        logger=MetricsLogger(config.output_dir, resume_step=resume_step), default_root_dir=config.output_dir,
        log_every_n_steps=config.log_every_n_steps, use_distributed_sampler=False,
        gradient_clip_val=config.optim.max_grad_norm, num_sanity_val_steps=0, limit_val_batches=0,
        enable_model_summary=False,
    )
    kwargs.update(trainer_kwargs)
    if kwargs.get("enable_progress_bar", True):
        kwargs["callbacks"] = [*kwargs["callbacks"], StepProgressBar()]  # never the caller's list
    with dropped("lightning.pytorch.utilities.rank_zero", "💡 Tip: "):  # Lightning's ads for litlogger/litmodels
        return L.Trainer(**kwargs)


def train_concept(config: "TrainConfig | dict | str | os.PathLike", **overrides) -> Path:
    """Train a concept and write its bundle; returns the bundle folder (OUTPUT_DIR/concept).

    `config` is a `TrainConfig`, a dict or a YAML path; `overrides` as in `load_config`
    (e.g. `max_steps=50, data={"photos": "photos/"}`). Resumes from OUTPUT_DIR/checkpoints/last.ckpt
    when present (`resume="auto"`), if it was trained from the same inputs (else `TrainingError`).
    """
    config = load_config(config, **overrides)
    bundle = config.bundle_dir
    if bundle.exists() and not config.overwrite:
        raise FileExistsError(f"a concept bundle already exists at {bundle}; pass overwrite=True (CLI: --overwrite)")
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = ConceptDataModule(config)  # reads and checks the photos before any model is loaded
    if builtin_kind(config.base) == "toy":
        _check_toy_inputs(config, datamodule.photos, datamodule.method.prompt_tokens())
    with folder_lock(config.output_dir):
        resume = _resume_path(config)
        inputs = training_inputs(config, datamodule.photos)
        record, step = read_checkpoint(resume) if resume else (None, None)
        if resume:
            check_resume(resume, record, inputs)  # before the base model loads
        module = PersonalizationModule(config)
        base = base_record(module.model.base_fingerprint)
        if resume:
            check_resume(resume, record, inputs, base)
        trainer = build_trainer(config, extra_callbacks=[InputsRecord(inputs, base), *module.model.method.callbacks()],
                                resume_step=step)
        if trainer.is_global_zero:
            write_record(config.output_dir, inputs, base)
        _fit(config, trainer, module, datamodule, resume)
        if trainer.is_global_zero:
            export_concept(module.model, config, bundle, photos=datamodule.photos, overwrite=config.overwrite)
        trainer.strategy.barrier("lrkit-export")
    return bundle


def _fit(config: TrainConfig, trainer: L.Trainer, module: PersonalizationModule, datamodule: ConceptDataModule,
         resume: str | None) -> None:
    with warnings.catch_warnings():
        # ConceptModel.train keeps the frozen modules in eval mode on purpose (see there)
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # a few photos make epochs shorter than log_every_n_steps; Lightning counts the interval in
        # optimizer steps across epochs, so the logs still come every n steps
        warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
        # Lightning's own use of a torch API that torch deprecates; nothing the user can change
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
        # a resumed run checkpoints into the folder it resumed from: lrkit owns that folder (its lock and the
        # recorded inputs keep other runs out), so its checkpoints being there is expected
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        with cpu_threads_for(config.base, trainer.strategy.root_device.type):
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)


def _check_toy_inputs(config: TrainConfig, photos, tokens: list[str]) -> None:
    """The toy base learns only toy-world pictures and words (and the concept's `tokens`): warn (once) about
    anything else."""
    from lrkit.toyworld.inputs import warn_outside_toy_world

    def fill(text: str) -> str:
        return text.replace("{token}", " ".join(tokens)).replace("{class}", config.data.class_word or "")

    prompts = [fill(config.data.caption_template), *(fill(p.caption) for p in photos if p.caption),
               *(fill(p) for p in config.validation.prompts)]
    warn_outside_toy_world(photos=[(p.name, p.image) for p in photos], prompts=prompts, known=tokens)


def export_concept(model: ConceptModel, config: TrainConfig, out_dir: "str | os.PathLike", *, photos=None,
                   overwrite: bool = False) -> Path:
    """Write `model`'s trained weights as a concept bundle (atomically) and return its folder.

    Refuses (`TrainingError`) weights holding NaN or infinite values."""
    method = model.method
    raise_if_nonfinite(model.trainable_state_dict(), f"no bundle written to {out_dir}",
                       "the run diverged; train again with a lower optim.lr")
    if photos is None:
        photos = method.select_photos(load_images(config.data.photos, min_size=1, image_column=config.data.image_column,
                                                  caption_column=config.data.caption_column))
    concept = Concept(
        name=config.concept_name, method=config.method, tokens=method.concept_tokens(),
        class_word=config.data.class_word, base=model.base_fingerprint, resolution=config.data.resolution,
        lora=method.lora_spec(), training=config.to_dict(), lrkit_version=__version__,
    )

    def write_files(root: Path) -> None:
        concept.files = method.write_files(model, root)
        concept.refs = write_refs(photos, root / "refs")
        method.finish_bundle(model, root, concept)

    write_bundle(concept, out_dir, write_files, overwrite=overwrite)
    logger.info("wrote concept bundle %s", out_dir)
    return Path(out_dir)


def export_checkpoint(checkpoint: "str | os.PathLike", out_dir: "str | os.PathLike", *, overwrite: bool = False,
                      base: str | None = None) -> Path:
    """`lrkit export`: rebuild the model from a training checkpoint and write its bundle.

    The checkpoint is read with `torch.load(weights_only=True)` (no arbitrary unpickling); its
    config says which base model and method to rebuild. `base` overrides the base model location
    (e.g. the same model in another folder).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable lrkit checkpoint ({err})") from err
    try:
        config_dict = ckpt["hyper_parameters"]["config"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} holds no lrkit training config; was it written by `lrkit train`?") from err
    if base is not None:
        config_dict = dict(config_dict, base=base)
    config = config_from_dict(config_dict)
    model = ConceptModel(config)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    expected = set(model.trainable_state_dict())
    if set(state) != expected:
        raise ValueError(f"{path}: its weights do not match a {config.method} model built from its own config")
    model.load_state_dict(state, strict=False)
    saved_callbacks = ckpt.get("callbacks") or {}
    for callback in model.method.callbacks():  # e.g. concept_em's masks live in its callback's state
        if callback.state_key in saved_callbacks:
            callback.load_state_dict(saved_callbacks[callback.state_key])
    return export_concept(model, config, out_dir, overwrite=overwrite)
