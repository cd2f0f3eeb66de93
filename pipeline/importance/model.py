"""The importance network f_theta (LM body + scalar head) and the LightningModule that fits it.

Only the decoder body runs: f is read from hidden states, so the LM's vocabulary logits (the
costliest layer of a small model) are never computed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.importance.loss import F_MAX, pair_nll
from pipeline.importance.metrics import ValidationStats
from pipeline.models import load_causal_lm

BACKBONE_MODES = ("frozen", "last_k", "lora")


@dataclass
class NetConfig:
    """Everything needed to rebuild the network's structure; the export stores it."""

    backbone: str
    backbone_mode: str = "frozen"
    last_k: int = 1
    lora_r: int = 8
    lora_alpha: int = 16
    head_hidden: int = 0  # 0: a linear head; > 0: one hidden layer of that width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _layers(body: nn.Module) -> nn.ModuleList:
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UserError(f"cannot find the transformer layers of {type(body).__name__}: use --backbone_mode frozen or lora")


class ImportanceNet(nn.Module):
    """f(t) = F_MAX * sigmoid(head(h_t)), h_t the body's last hidden state at the last token of prompt + completion[:t]."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        if config.backbone_mode not in BACKBONE_MODES:
            raise UserError(f"--backbone_mode must be one of {', '.join(BACKBONE_MODES)}, got '{config.backbone_mode}'")
        self.config = config
        self.body = load_causal_lm(config.backbone).get_decoder()
        self.body.requires_grad_(False)
        if config.backbone_mode == "last_k":
            layers = _layers(self.body)
            if not 1 <= config.last_k <= len(layers):
                raise UserError(f"--last_k must be in 1..{len(layers)} for this backbone, got {config.last_k}")
            layers[-config.last_k:].requires_grad_(True)
            if isinstance(getattr(self.body, "norm", None), nn.Module):
                self.body.norm.requires_grad_(True)
        elif config.backbone_mode == "lora":
            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules="all-linear")
            inject_adapter_in_model(lora, self.body)
        width = self.body.config.hidden_size
        self.head = (nn.Linear(width, 1) if config.head_hidden <= 0 else
                     nn.Sequential(nn.Linear(width, config.head_hidden), nn.GELU(), nn.Linear(config.head_hidden, 1)))

    def train(self, mode: bool = True) -> ImportanceNet:
        """A frozen body stays in eval mode: no dropout, so its features are a fixed function."""
        super().train(mode)
        if self.config.backbone_mode == "frozen":
            self.body.eval()
        return self

    def init_head(self, f0: float) -> None:
        """Start at the constant f0 (the baseline, kept off the sigmoid's flat ends): training adds what depends on the prefix."""
        last = self.head if isinstance(self.head, nn.Linear) else self.head[-1]
        p = min(max(f0 / F_MAX, 0.02), 0.98)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(math.log(p / (1 - p)))

    def features(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor) -> Tensor:
        """Hidden states (B, K, H) at ``positions`` (B, K) of a right-padded batch: one forward pass."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))

    def f_from_features(self, features: Tensor) -> Tensor:
        return F_MAX * torch.sigmoid(self.head(features).squeeze(-1).float())

    def forward(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor) -> Tensor:
        return self.f_from_features(self.features(input_ids, attention_mask, positions))

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The weights training changes (head, last layers or LoRA): with the backbone they rebuild the net."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}


class ImportanceModule(L.LightningModule):
    """Maximum likelihood of the sisters' rewards under correlation f (DESIGN.md section 1)."""

    def __init__(self, net_config: dict[str, Any], baseline_f: float, lr: float = 1e-2,
                 backbone_lr: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = ImportanceNet(NetConfig(**net_config))
        self.net.init_head(baseline_f)
        self.strict_loading = False  # checkpoints hold only the trainable weights, the backbone is reloaded
        self._feature_cache: dict[int, Tensor] = {}
        self._stats: ValidationStats | None = None
        self.val_summary: dict[str, Any] = {}

    def _f(self, batch: dict[str, Tensor]) -> Tensor:
        """f per pair. A frozen body's features never change, so each pair's are computed once."""
        args = (batch["input_ids"], batch["attention_mask"], batch["last"].unsqueeze(1))
        if self.net.config.backbone_mode != "frozen":
            return self.net(*args).squeeze(1)
        keys = batch["index"].tolist()
        if any(k not in self._feature_cache for k in keys):
            with torch.no_grad():
                self._feature_cache.update(zip(keys, self.net.features(*args).squeeze(1), strict=True))
        return self.net.f_from_features(torch.stack([self._feature_cache[k] for k in keys]))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = pair_nll(self._f(batch), batch["z1"], batch["z2"]).mean()
        self.log("train/nll", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(batch["z1"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._stats = ValidationStats(self.hparams.baseline_f, self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._stats.update(self._f(batch), batch["z1"], batch["z2"], batch["relative"])

    def on_validation_epoch_end(self) -> None:
        self._stats.reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        self.val_summary = self._stats.summary()
        for key in ("nll", "baseline_nll", "gain", "calibration_error"):
            self.log(f"val/{key}", self.val_summary[key], prog_bar=key in ("nll", "gain"))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        head = list(self.net.head.parameters())
        body = [p for p in self.net.body.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": self.hparams.lr}]
        if body:
            groups.append({"params": body, "lr": self.hparams.backbone_lr})
        return torch.optim.AdamW(groups, weight_decay=0.0)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep checkpoints small: a frozen backbone's weights are reloaded from ``--backbone``."""
        keep = {f"net.{name}" for name in self.net.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
