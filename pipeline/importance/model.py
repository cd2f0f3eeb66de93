"""The importance network f_theta (LM body + scalar head) and the LightningModule that fits it.

Only the decoder body runs: f is read from hidden states, so the LM's vocabulary logits (the
costliest layer of a small model) are never computed. The head sees each completion token's
hidden state (layer-normalised) and a basis of its position in the completion
(``forms.position_features``), or either alone, or (``context``, the default) the states of every token of
prompt + completion mixed by an attention block of its own (``context_head``); ``forms`` turns its outputs
into f(0..L).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.importance.config import ImportanceArgs
from pipeline.importance.context_head import ContextHead, scalar_head
from pipeline.importance.forms import FORMS, KNOTS, curve, f_along, initial_bias, position_features
from pipeline.importance.loss import LIKELIHOODS
from pipeline.importance.metrics import ValidationStats
from pipeline.importance.states import TokenIds, completion_states, context_features
from pipeline.models import load_causal_lm

BACKBONE_MODES = ("frozen", "last_k", "lora")
FEATURES = ("context", "state+position", "state", "position")  # what the head sees at each completion position
TOKEN_FEATURES = FEATURES[1:]  # the heads that read one completion token at a time (stage 3's online head too)
STATE_LEVERAGE = 4.0  # the state block moves a(u) this many times faster than the position basis (measured)


@dataclass
class NetConfig:
    """Everything needed to rebuild the network's structure; the export stores it. Its defaults are stage 2's
    options' (``ImportanceArgs``), not competing ones."""

    backbone: str
    backbone_mode: str = ImportanceArgs.backbone_mode
    last_k: int = ImportanceArgs.last_k
    lora_r: int = ImportanceArgs.lora_r
    lora_alpha: int = ImportanceArgs.lora_alpha
    head_hidden: int = ImportanceArgs.head_hidden  # 0: a linear head; > 0: one hidden layer of that width
    form: str = ImportanceArgs.f_form  # forms.FORMS
    pin_end: bool = ImportanceArgs.f_end == "pinned"  # False: f(len) comes from the head like every other position
    features: str = ImportanceArgs.features  # FEATURES
    constant: float | None = None  # set when the best candidate on validation was the constant f: f = it for 0 < t

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _layers(body: nn.Module) -> nn.ModuleList:
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UserError(f"cannot find the transformer layers of {type(body).__name__}: use --backbone_mode frozen or lora")


def make_head(hidden_size: int, config: NetConfig) -> nn.Module:
    """The head on ``head_inputs``: linear, or one hidden layer of ``config.head_hidden``; or the context head."""
    if config.features == "context":
        return ContextHead(2 * hidden_size, config.head_hidden)
    width = (hidden_size if "state" in config.features else 0) + (len(KNOTS) if "position" in config.features else 0)
    return scalar_head(width, config.head_hidden)


def start_head(head: nn.Module, form: str, value: float) -> None:
    """Zero the last layer's weights and set its bias so that the form starts at the constant ``value``."""
    last = head.out if isinstance(head, ContextHead) else head
    last = last if isinstance(last, nn.Linear) else last[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(initial_bias(form, value))


def head_inputs(states: Tensor, u: Tensor, features: str) -> Tensor:
    """What the head reads at completion positions u (...) from states (..., H): stage 2's net and stage 3's
    online head (``pipeline.grpo.online_importance``) alike."""
    # Under Adam every weight moves about lr per step, so a block of n inputs of size s moves a(u) by up to
    # ~lr * n * s per step. The normalised state divided by H (n = H, s ~ 1/H) and the position basis (two
    # active inputs summing to 1) both move it ~lr per step, whatever the backbone's width: one lr suits
    # every backbone and neither block outruns the other (measured: with raw states, a step in position was
    # learnt as a ramp, and a 576-wide state overfitted a 2,000-pair dump within one epoch).
    parts = []
    if "state" in features:
        parts.append(F.layer_norm(states, states.shape[-1:]) * (STATE_LEVERAGE / states.shape[-1]))
    if "position" in features:
        parts.append(position_features(u))
    return torch.cat(parts, dim=-1)


def head_logits(head: nn.Module, states: Tensor, u: Tensor, features: str) -> Tensor:
    """a(u) (...) from states (..., H) at completion positions u (...); the small head kept in fp32 under mixed
    precision."""
    with torch.autocast(u.device.type, enabled=False):
        return head(head_inputs(states, u, features).to(next(head.parameters()).dtype)).squeeze(-1)


def context_head_f(head: nn.Module, form: str, features: Tensor, lengths: Tensor, prompt_lengths: Tensor,
                   width: int) -> Tensor:
    """f(1..width) (R, width) of the context head on ``ContextInputs``-shaped features, before the ends are pinned;
    the small head runs in fp32 under mixed precision, as ``head_logits``."""
    with torch.autocast(features.device.type, enabled=False):
        logits = head(features.to(next(head.parameters()).dtype), lengths, prompt_lengths, width)
    return f_along(form, logits.float())


def context_pair_f(head: nn.Module, form: str, rows: Sequence[Tensor], prompt_lengths: Tensor, split: Tensor) -> Tensor:
    """f(t) of each pair at its split t from its context rows (P + t, 2H): the context head's features of prompt +
    prefix; 0 where t = 0 (the pinned start: such a row may hold nothing, and is never run). Stage 2's pairs and
    stage 3's online head alike."""
    moved = (split > 0).nonzero().squeeze(1).tolist()
    f = torch.zeros(len(split), device=split.device)
    if not moved:
        return f
    lengths = torch.tensor([len(rows[i]) for i in moved], device=split.device)
    features = torch.stack([F.pad(rows[i], (0, 0, 0, int(lengths.max()) - len(rows[i]))) for i in moved])
    t = split[moved]
    f_moved = context_head_f(head, form, features, lengths, prompt_lengths[moved], int(t.max()))
    at_split = f_moved.gather(1, (t - 1).unsqueeze(1)).squeeze(1)
    return f.index_put((torch.tensor(moved, device=split.device),), at_split)


class ImportanceNet(nn.Module):
    """a(u) = head([norm(h_u), position basis of u]) per completion position u; f from ``forms.curve``."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        if config.backbone_mode not in BACKBONE_MODES:
            raise UserError(f"--backbone_mode must be one of {', '.join(BACKBONE_MODES)}, got '{config.backbone_mode}'")
        if config.form not in FORMS:
            raise UserError(f"--f_form must be one of {', '.join(FORMS)}, got '{config.form}'")
        if config.features not in FEATURES:
            raise UserError(f"--features must be one of {', '.join(FEATURES)}, got '{config.features}'")
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
        self.reads_context = config.features == "context"
        self.uses_states = self.reads_context or "state" in config.features
        self.head = make_head(self.body.config.hidden_size, config)

    def train(self, mode: bool = True) -> ImportanceNet:
        """A frozen body stays in eval mode: no dropout, so its features are a fixed function."""
        super().train(mode)
        if self.config.backbone_mode == "frozen":
            self.body.eval()
        return self

    def init_head(self, value: float) -> None:
        """Start at a constant (f = value, or hazard rate = value for the monotone form): training adds what
        depends on the prefix."""
        start_head(self.head, self.config.form, value)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def states(self, prompts: Sequence[TokenIds], completions: Sequence[TokenIds]) -> Tensor:
        """(R, W, H) hidden states at the completion tokens (one forward per distinct prompt); (R, W, 0) and
        no forward at all when the head reads positions only."""
        if not self.uses_states:
            return torch.zeros(len(completions), max((len(c) for c in completions), default=0), 0, device=self.device)
        return completion_states(self.body, prompts, completions, self.device)

    def logits(self, states: Tensor, u: Tensor) -> Tensor:
        """a(u) (R, W) from states (R, W, H) at completion positions u (R, W), u = tokens in the prefix."""
        return head_logits(self.head, states, u, self.config.features)

    def inner_f(self, states: Tensor, u: Tensor) -> Tensor:
        """f(u) (R, W) of the form at positions u, before the ends are pinned."""
        if self.config.constant is not None:
            return torch.full(u.shape, self.config.constant, device=u.device)
        return f_along(self.config.form, self.logits(states, u).float())

    def context_f(self, features: Tensor, lengths: Tensor, prompt_lengths: Tensor, width: int) -> Tensor:
        """f(1..width) (R, width) of the context head from ``states.context_features``, before the ends are pinned."""
        if self.config.constant is not None:
            return torch.full((len(lengths), width), self.config.constant, device=features.device)
        return context_head_f(self.head, self.config.form, features, lengths, prompt_lengths, width)

    def curve(self, prompts: Sequence[TokenIds], completions: Sequence[TokenIds]) -> Tensor:
        """(R, W + 1): f(0..W) of each completion, pinned ends, f(len) repeated past its end."""
        lengths = torch.tensor([len(c) for c in completions], device=self.device)
        width = max((len(c) for c in completions), default=0)
        if self.reads_context:
            inner = self.context_f(*context_features(self.body, prompts, completions, self.device), width)
        else:
            states = self.states(prompts, completions)
            u = torch.arange(1, width + 1, device=states.device).expand(states.shape[:2])
            inner = self.inner_f(states, u)
        return curve(inner, lengths, self.config.pin_end)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The weights training changes (head, last layers or LoRA): with the backbone they rebuild the net."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}


class FeatureCache:
    """A frozen body's states of each pair's prefix, computed once per pair (by the rank that sees it).

    ``keep='last'`` stores the state at the split only (all the direct form reads), ``'all'`` every
    prefix state (the monotone form, and runs that share one cache across forms), ``'context'`` the
    context head's features of every token of prompt + prefix.
    """

    def __init__(self, keep: str) -> None:
        self.keep = keep
        self.rows: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)


class ImportanceModule(L.LightningModule):
    """Fits f by the chosen pair likelihood (docs/design.md); validation compares it with the best constant."""

    def __init__(self, net_config: dict[str, Any], likelihood: str, init_value: float, baseline_f: float, *,
                 lr: float, backbone_lr: float, weight_decay: float, feature_cache: FeatureCache | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["feature_cache"])
        self.net = ImportanceNet(NetConfig(**{**net_config, "constant": None}))
        self.net.init_head(init_value)
        self.loss_fn = LIKELIHOODS[likelihood]
        self.strict_loading = False  # checkpoints hold only the trainable weights, the backbone is reloaded
        needed = "context" if self.net.reads_context else "all" if self.net.config.form == "monotone" else "last"
        serves = (needed, "all") if needed == "last" else (needed,)  # an 'all' cache holds the last state too
        if feature_cache is not None and feature_cache.keep not in serves:
            raise ValueError(f"a feature cache keeping '{feature_cache.keep}' rows cannot serve the {needed} form")
        self.features = feature_cache if feature_cache is not None else FeatureCache(needed)
        self.features_computed = 0
        self._stats: ValidationStats | None = None
        self.val_summary: dict[str, Any] = {}

    def _rows(self, prompts: list[TokenIds], prefixes: list[TokenIds]) -> list[Tensor]:
        """Per pair, what the head reads: its prefix states (t, H), or the context head's features of prompt +
        prefix (P + t, 2H)."""
        if self.net.reads_context:
            features, lengths, _ = context_features(self.net.body, prompts, prefixes, self.device)
            return [features[i, :n] for i, n in enumerate(lengths.tolist())]
        states = self.net.states(prompts, prefixes)
        return [states[i, : len(p)] for i, p in enumerate(prefixes)]

    def _prefix_states(self, batch: dict[str, Any]) -> list[Tensor]:
        """Per pair, its ``_rows`` (or the last prefix state (1, H) for the direct form); frozen ones cached."""
        prompts, prefixes = batch["prompt"], batch["prefix"]
        if not self.net.uses_states:  # a position-only head: no forward, nothing to cache (or to read from a cache)
            return [torch.zeros(len(p), 0, device=self.device) for p in prefixes]
        if self.net.config.backbone_mode != "frozen":
            return self._rows(prompts, prefixes)
        keys = batch["index"].tolist()
        needs_row = [self.net.reads_context or len(p) > 0 for p in prefixes]  # a context row holds the prompt too
        missing = [i for i, k in enumerate(keys) if k not in self.features.rows and needs_row[i]]
        if missing:
            with torch.no_grad():
                rows = self._rows([prompts[i] for i in missing], [prefixes[i] for i in missing])
            for row, i in zip(rows, missing, strict=True):
                self.features.rows[keys[i]] = row[-1:] if self.features.keep == "last" else row
            self.features_computed += len(missing)
        return [self.features.rows[k] if needed else self._empty() for k, needed in zip(keys, needs_row, strict=True)]

    def _empty(self) -> Tensor:
        return torch.zeros(0, self.net.body.config.hidden_size, device=self.device)

    def pair_f(self, batch: dict[str, Any]) -> Tensor:
        """f(t) of each pair at its split t (0 where t = 0: the pinned start)."""
        split = batch["split"]
        if self.net.reads_context:
            return self._context_pair_f(batch)
        rows = [s[-1:] if self.net.config.form == "direct" else s for s in self._prefix_states(batch)]
        n = torch.tensor([len(r) for r in rows], device=split.device)
        width = max(int(n.max()), 1)
        states = torch.stack([F.pad(r, (0, 0, 0, width - len(r))) for r in rows])
        steps = torch.arange(width, device=split.device)
        u = (split.unsqueeze(1) if self.net.config.form == "direct" else steps + 1).expand(len(rows), width)
        f = self.net.inner_f(states, u)
        at_split = f.gather(1, (n - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        return torch.where(split > 0, at_split, torch.zeros_like(at_split))

    def _context_pair_f(self, batch: dict[str, Any]) -> Tensor:
        prompt_lengths = torch.tensor([len(p) for p in batch["prompt"]], device=batch["split"].device)
        return context_pair_f(self.net.head, self.net.config.form, self._prefix_states(batch), prompt_lengths,
                              batch["split"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss_fn(self.pair_f(batch), batch).mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=len(batch["split"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._stats = ValidationStats(self.hparams.likelihood, self.hparams.baseline_f,
                                      self.trainer.datamodule.counts["prompts_val"], self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._stats.update(self.pair_f(batch), batch)

    def on_validation_epoch_end(self) -> None:
        self._stats.reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        self.val_summary = self._stats.summary()
        for key in ("loss", "baseline_loss", "gain", "calibration_error"):
            self.log(f"val/{key}", self.val_summary[key], prog_bar=key in ("loss", "gain"))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW, the learning rate decaying to 0 along a cosine over ``max_epochs`` (so late epochs settle
        instead of jittering around the optimum); weight decay on weights, never on biases."""
        decay = self.hparams.weight_decay
        head_weights = [p for n, p in self.net.head.named_parameters() if not n.endswith("bias")]
        head_biases = [p for n, p in self.net.head.named_parameters() if n.endswith("bias")]
        body = [p for p in self.net.body.parameters() if p.requires_grad]
        groups = [{"params": head_weights, "lr": self.hparams.lr, "weight_decay": decay},
                  {"params": head_biases, "lr": self.hparams.lr, "weight_decay": 0.0}]
        if body:
            groups.append({"params": body, "lr": self.hparams.backbone_lr, "weight_decay": decay})
        optimizer = torch.optim.AdamW(groups)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep checkpoints small: a frozen backbone's weights are reloaded from ``--backbone``."""
        keep = {f"net.{name}" for name in self.net.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
