"""Training concepts (never imports lrkit.inference)."""

from lrkit.training.config import TrainConfig, load_config
from lrkit.training.train import export_checkpoint, export_concept, train_concept

__all__ = ["TrainConfig", "export_checkpoint", "export_concept", "load_config", "train_concept"]
