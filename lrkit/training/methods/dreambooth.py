"""`dreambooth`: full UNet (optionally text encoder) fine-tuning with prior preservation."""

from __future__ import annotations

from pathlib import Path

from lrkit.training.methods.base import Method, trainable


class DreamBoothMethod(Method):
    name = "dreambooth"
    default_lr = 5e-6

    @property
    def _te(self) -> bool:
        return self.config.dreambooth.train_text_encoder

    def configure(self, model) -> None:
        model.unet.requires_grad_(True)
        if self._te:
            model.text_encoder.requires_grad_(True)

    def param_groups(self, model) -> list[dict]:
        lr = self.config.optim.lr or self.default_lr
        wd = self.config.optim.weight_decay
        groups = [dict(name="unet", params=trainable(model.unet), lr=lr, weight_decay=wd)]
        if self._te:
            groups.append(dict(name="text_encoder", params=trainable(model.text_encoder), lr=lr, weight_decay=wd))
        return groups

    def text_encoder_frozen(self) -> bool:
        return not self._te

    def trains_module(self, module_name: str) -> bool:
        return module_name == "unet" or (module_name == "text_encoder" and self._te)

    def write_files(self, model, root: Path) -> dict[str, str]:
        model.unet.save_pretrained(root / "unet", safe_serialization=True)
        files = {"unet": "unet"}
        if self._te:
            model.text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
            files["text_encoder"] = "text_encoder"
        return files
