"""Stage-2 arguments: one dataclass, the one default of every option (the CLI, ``run`` and the network's
``NetConfig`` read them from here), as stage 3's ``GRPOArgs`` (TRL's GRPOConfig style)."""

from __future__ import annotations

from dataclasses import dataclass

# A resumed run must see the same data and network as the one it continues.
IDENTITY_ARGS = ("rollouts", "backbone", "reward_key", "group_stats", "val_fraction", "seed", "backbone_mode",
                 "last_k", "lora_r", "lora_alpha", "head_hidden", "likelihood", "f_form", "f_end", "features")


@dataclass
class ImportanceArgs:
    rollouts: str  # the stage-1 dump: a parquet file or a directory of part files
    backbone: str | None = None  # None: the dump's model_name
    reward_key: str = "reward"
    group_stats: str = "prompt"
    likelihood: str = "auto"  # auto: bernoulli on pairs of 0/1 prompts, gaussian on the others
    f_form: str = "monotone"
    f_end: str = "pinned"
    features: str = "context"  # context: an attention block over prompt + completion (docs/credit.md)
    backbone_mode: str = "frozen"
    last_k: int = 1
    lora_r: int = 8
    lora_alpha: int = 16
    head_hidden: int = 64  # 0: a linear head
    val_fraction: float = 0.1
    max_epochs: int = 20
    patience: int = 5  # 0: no early stopping
    per_device_train_batch_size: int = 32  # pairs per batch on each device (formerly batch_size)
    lr: float = 5e-4  # 1e-3 until 2026-12-08: on the credit task it kept worse epochs (docs/credit.md)
    ema_decay: float = 0.99  # validate, keep and export an EMA of the weights (docs/importance.md); 0: the raw weights
    max_grad_norm: float = 1.0  # clip the gradient's global norm to this, as TRL's max_grad_norm; 0: no clipping
    weight_decay: float = 0.01
    backbone_lr: float = 1e-4
    precision: str = "32-true"
    devices: str = "1"
    accelerator: str = "auto"
    seed: int = 0
    run_name: str | None = None  # None: <backbone_mode>-<reward column>-<group_stats>
    out_dir: str | None = None  # root of the output tree; None: beside the dump
    resume: bool = False
    report_examples: int = 8
    report_to: tuple[str, ...] = ("csv",)
