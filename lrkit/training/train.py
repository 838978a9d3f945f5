"""`train_concept`: config -> Lightning run -> concept bundle. And export from a checkpoint.

The CLI (`lrkit train`, `lrkit export`), the scripts in train/ and the Python API call these. A run holds
OUTPUT_DIR's lock, resumes only a checkpoint trained from the same inputs, and appends to its metrics
(`lrkit.training.folder`); nothing with NaN or infinite weights is saved or exported.
"""

from __future__ import annotations

import contextlib
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
from lrkit.training.sharding import build_strategy, is_fsdp, single_process_notes_dropped
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
                  model: ConceptModel | None = None, **trainer_kwargs) -> L.Trainer:
    """The Lightning trainer of `config`; `resume_step` (a resume from that step) keeps the rows of the earlier
    steps in logs/metrics.csv. `strategy: fsdp` needs the `model` it will shard (`lrkit.training.sharding`)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=config.checkpoint_dir, filename="last", save_top_k=1, monitor=None,
                                 every_n_epochs=config.checkpoint_every_n_epochs, save_on_train_epoch_end=True,
                                 enable_version_counter=False)
    kwargs = dict(
        max_steps=config.max_steps, max_epochs=-1, precision=config.precision, accelerator=config.accelerator,
        devices=world_from_environment(config.devices), num_nodes=config.num_nodes,
        strategy=build_strategy(config.strategy, model),
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


def train_concept(config: "TrainConfig | dict | str | os.PathLike", *, callbacks: "list | tuple" = (),
                  **overrides) -> Path:
    """Train a concept and write its bundle; returns the bundle folder (OUTPUT_DIR/concept).

    `config` is a `TrainConfig`, a dict or a YAML path; `overrides` as in `load_config`
    (e.g. `max_steps=50, data={"photos": "photos/"}`). Resumes from OUTPUT_DIR/checkpoints/last.ckpt
    when present (`resume="auto"`), if it was trained from the same inputs (else `TrainingError`).
    `callbacks`: Lightning callbacks added to the run's (e.g. to follow its progress).
    """
    config = load_config(config, **overrides)
    bundle = config.bundle_dir
    if bundle.exists() and not config.overwrite:
        raise FileExistsError(f"a concept bundle already exists at {bundle}; pass overwrite=True (CLI: --overwrite)")
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = ConceptDataModule(config)  # reads and checks the photos before any model is loaded
    if builtin_kind(config.base) == "toy":
        _check_toy_inputs(config, datamodule.photos, datamodule.method.prompt_tokens())
    with folder_lock(config.output_dir), _own_process_group():
        resume = _resume_path(config)
        inputs = training_inputs(config, datamodule.photos)
        record, step = read_checkpoint(resume) if resume else (None, None)
        if resume:
            check_resume(resume, record, inputs)  # before the base model loads
        module = PersonalizationModule(config)
        base = base_record(module.model.base_fingerprint)
        if resume:
            check_resume(resume, record, inputs, base)
        trainer = build_trainer(config, extra_callbacks=[InputsRecord(inputs, base), *module.model.method.callbacks(),
                                                         *callbacks], resume_step=step, model=module.model)
        if trainer.is_global_zero:
            write_record(config.output_dir, inputs, base)
        _fit(config, trainer, module, datamodule, resume)
        model = module.model
        if is_fsdp(trainer.strategy):
            # the trained weights are sharded: gather them (every rank takes part) into a model built afresh
            with single_process_notes_dropped():
                state = trainer.strategy.lightning_module_state_dict()
            model = _model_from_state(config, state, module.model.method.callbacks()) if trainer.is_global_zero else None
        if trainer.is_global_zero:
            export_concept(model, config, bundle, photos=datamodule.photos, overwrite=config.overwrite)
        trainer.strategy.barrier("lrkit-export")
    return bundle


@contextlib.contextmanager
def _own_process_group():
    """Destroy the process group a run in this process started (a multi-device or FSDP run started without a
    launcher), so that the caller's process is as it was; one a launcher or the caller started is left alone."""
    started = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        yield
    finally:
        if not started and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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
        with cpu_threads_for(config.base, trainer.strategy.root_device.type), single_process_notes_dropped():
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
        from lrkit.card import write_card

        concept.files = method.write_files(model, root)
        concept.refs = write_refs(photos, root / "refs")
        method.finish_bundle(model, root, concept)
        # the card, with a grid of the run's last validation images when it made some
        write_card(concept, root, validation=Path(config.output_dir) / "validation")

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
    if {k.removeprefix("model.") for k in ckpt["state_dict"]} != model.trainable_names():
        raise ValueError(f"{path}: its weights do not match a {config.method} model built from its own config")
    _load_trained(model, ckpt["state_dict"], ckpt.get("callbacks") or {})
    return export_concept(model, config, out_dir, overwrite=overwrite)


def _load_trained(model: ConceptModel, state: dict, callbacks: dict) -> None:
    """Load a checkpoint's trainable weights (`model.`-prefixed, as the Lightning module names them) and its
    method callbacks' state into `model`."""
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    for callback in model.method.callbacks():  # e.g. concept_em's masks live in its callback's state
        if callback.state_key in callbacks:
            callback.load_state_dict(callbacks[callback.state_key])


def _model_from_state(config: TrainConfig, state: dict, callbacks: list) -> ConceptModel:
    """A model built from `config`'s base holding the trained weights of a full state dict (the sharded run's,
    gathered) and the state of the run's method `callbacks`."""
    model = ConceptModel(config)
    names = {f"model.{k}" for k in model.trainable_names()}
    _load_trained(model, {k: v for k, v in state.items() if k in names},
                  {c.state_key: c.state_dict() for c in callbacks})
    return model
