"""Checkpoints of a pretraining run (safetensors + `state.json` in `OUT/checkpoint`) and the EMA of the weights."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch


@dataclass
class RunState:
    """A run's progress, saved in `state.json`: enough to resume it."""

    phase: str = "vae"
    """"vae", then "unet" (the VAE is frozen and the pool encoded)."""
    vae_step: int = 0
    """VAE steps done."""
    step: int = 0
    """UNet steps done."""
    elapsed: float = 0.0
    """Seconds of the run when the checkpoint was written, earlier processes included."""
    scaling_factor: float | None = None
    """The VAE's latent scaling factor, once the VAE phase is over."""
    pool_next_seed: int = 0
    """The pool's next fresh seed (`SamplePool.next_seed`)."""
    vae_seconds: float = 0.0
    """Seconds of the run when the UNet phase began."""
    final_loss: float | None = None
    """Running MSE of the UNet at the last step."""

    @classmethod
    def from_dict(cls, saved: dict) -> RunState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


class Checkpoint:
    """The checkpoint folder of a run: named groups of tensors (one safetensors file each) and `state.json`
    (the `RunState` and the config), replaced as a whole on every save."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    def read_state(self) -> RunState:
        return RunState.from_dict(json.loads(self.state_path.read_text())["state"])

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.safetensors").is_file()

    def load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / f"{name}.safetensors"))

    def save(self, tensors: dict[str, dict[str, torch.Tensor]], state: RunState, config: dict) -> None:
        """Write the groups of `tensors` and `state.json` next to the folder, then swap it in."""
        from safetensors.torch import save_file

        tmp = self.path.with_name(self.path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, group in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"state": asdict(state), "config": config}, indent=1))
        shutil.rmtree(self.path, ignore_errors=True)
        tmp.rename(self.path)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict:
    """The optimizer's per-parameter state as flat tensors, keyed `{parameter name}::{state key}`."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                out[f"{names[p]}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                           tensors: dict) -> None:
    """Put `optimizer_tensors` back into the (AdamW) optimizer."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            keys = [k for k in ("step", "exp_avg", "exp_avg_sq") if f"{names[p]}::{k}" in tensors]
            if keys:
                optimizer.state[p] = {k: tensors[f"{names[p]}::{k}"].to(p.device, copy=True) for k in keys}


class EMA:
    """Exponential moving average of a module's float parameters (decay warmed up as (1+n)/(10+n))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        live = module.state_dict()
        keys = [k for k in self.shadow if k in live]
        # shadow <- shadow + (1 - d) (live - shadow): one fused call per module instead of one per tensor
        torch._foreach_lerp_([self.shadow[k] for k in keys], [live[k].detach() for k in keys], 1 - d)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({**module.state_dict(), **self.shadow})


__all__ = ["EMA", "Checkpoint", "RunState", "load_optimizer_tensors", "optimizer_tensors"]
