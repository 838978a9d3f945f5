"""`strategy: fsdp`: train a model too large for one device's memory (a full SDXL DreamBooth) sharded over several.

Lightning's `FSDPStrategy`, set up for a concept model: what trains (the UNet, a text encoder that trains) is
sharded block by block (`ModelFamily.shard_blocks`), each trained module itself one unit around its blocks, so
calling it (the training step, validation images) gathers its weights on every rank; what is frozen (the VAE,
frozen text encoders) is not sharded but kept whole on each rank, so the latent and text caches and class images
use it as without FSDP. Weights and optimizer state are sharded (`FULL_SHARD`); checkpoints hold the full
trainable weights (gathered to rank 0), as single-device checkpoints do, so `lrkit export` and resume read them
alike. Gradient clipping uses FSDP's own norm over the shards.

Any other `strategy` string is passed to Lightning as it is.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)

WRAPPED_PREFIX = "_fsdp_wrapped_module."


def is_fsdp(strategy) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def build_strategy(name: str, model: nn.Module):
    """The Lightning strategy for `strategy: NAME` and a `ConceptModel` (its modules and what trains in them)."""
    if name != "fsdp":
        return name
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    modules = [model.vae, *model.text_encoders, model.unet]
    trained = [m for m in modules if any(p.requires_grad for p in m.parameters())]
    blocks = {type(m) for top in trained for m in top.modules() if type(m).__name__ in model.family.shard_blocks}
    return _strategy_class()(
        auto_wrap_policy=ModuleWrapPolicy({*blocks, *(type(m) for m in trained)}),
        ignored_modules=[m for m in modules if m not in trained],
        sharding_strategy="FULL_SHARD", state_dict_type="full", use_orig_params=True, limit_all_gathers=True,
    )


def clean_name(name: str) -> str:
    """A parameter's name as without FSDP (its wrappers' prefixes removed)."""
    return name.replace(WRAPPED_PREFIX, "")


@contextlib.contextmanager
def single_process_notes_dropped():
    """Without torch's FSDP notes on a one-process run (it shards nothing, and its state dicts are whole):
    `ConceptFSDPStrategy` says that once, in lrkit's words."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"FSDP is switching to use `NO_SHARD`")
        warnings.filterwarnings("ignore", message=r"When using ``NO_SHARD`` for ``ShardingStrategy``")
        yield


def _strategy_class():
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy

    class DevicePrecision(FSDPPrecision):
        """Lightning's FSDP precision, autocasting on the strategy's device (Lightning's autocasts on CUDA only)."""

        device_type = "cuda"

        def forward_context(self):
            if "mixed" in self.precision and self.device_type != "cuda":
                dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
                return torch.autocast(self.device_type, dtype=dtype)
            return super().forward_context()

    class ConceptFSDPStrategy(FSDPStrategy):
        """Lightning's FSDP strategy, which also runs on CPU processes (gloo), as torch's FSDP does when told the
        device: the tests shard over CPU processes; users shard over GPUs. (Lightning refuses its own class on a
        CPU accelerator, leaves FSDP to guess a CPU device, which it does not, and autocasts on CUDA only.)"""

        @property
        def precision_plugin(self) -> FSDPPrecision:
            return FSDPStrategy.precision_plugin.fget(self)

        @precision_plugin.setter
        def precision_plugin(self, plugin) -> None:
            if type(plugin) is FSDPPrecision:
                plugin = DevicePrecision(plugin.precision, plugin.scaler)
            FSDPStrategy.precision_plugin.fset(self, plugin)

        def setup_environment(self) -> None:
            super().setup_environment()
            if self.world_size == 1:
                logger.warning("strategy fsdp in one process shards nothing: start one process per GPU "
                               "(e.g. --devices 4, or torchrun --nproc_per_node 4 train/train.py ...)")
            if isinstance(self._precision_plugin, DevicePrecision):
                self._precision_plugin.device_type = self.root_device.type

        def optimizer_state(self, optimizer) -> dict:
            if self.root_device.type != "cpu":
                return super().optimizer_state(optimizer)
            # Lightning gathers the full state offloaded to the CPU. Torch's FSDP gathers each state into one
            # buffer and offloads it with `.cpu()`, which on a CPU is that buffer itself: the next state gathered
            # overwrites it (AdamW's exp_avg came back as its exp_avg_sq). Without offloading it clones each one.
            from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import StateDictType

            optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's
            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                      FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                      FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
                state = FSDP.optim_state_dict(self.model, optimizer)
                if self.global_rank == 0:
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

        def _setup_model(self, model: nn.Module) -> nn.Module:
            if self.root_device.type != "cpu":
                with single_process_notes_dropped():
                    return super()._setup_model(model)
            from torch.distributed.fsdp import FullyShardedDataParallel

            with single_process_notes_dropped():
                return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                                mixed_precision=self.mixed_precision_config,
                                                sharding_strategy=self.sharding_strategy,
                                                device_id=self.root_device, **self.kwargs)

    return ConceptFSDPStrategy
