"""Stage 2's EMA of the trainable weights: the arithmetic, what validation and checkpoints see, and exact resume."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.importance.averaging import CURRENT, TrainableEMA

DECAY, STEPS, GRAD = 0.9, 5, 0.5


class Drift(L.LightningModule):
    """One weight that SGD (lr 1) moves by -GRAD every step, and a frozen one; validation records what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.frozen = torch.nn.Parameter(torch.tensor(3.0), requires_grad=False)
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        return self.w * GRAD

    def validation_step(self, batch, batch_idx):
        self.seen.append(float(self.w))

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=1.0)


def _loader():
    return DataLoader(TensorDataset(torch.zeros(STEPS)), batch_size=1)


def _trainer(tmp_path, callbacks, epochs):
    return L.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                     enable_checkpointing=False)


def _ema(steps: int) -> float:
    average = 1.0
    for k in range(1, steps + 1):
        average = DECAY * average + (1 - DECAY) * (1.0 - k * GRAD)
    return average


def test_validation_sees_the_average_and_training_goes_on_from_the_raw_weights(tmp_path):
    module = Drift()
    _trainer(tmp_path, [TrainableEMA(DECAY)], epochs=2).fit(module, _loader(), _loader())
    assert module.seen[0] == pytest.approx(_ema(STEPS)) and module.seen[-1] == pytest.approx(_ema(2 * STEPS))
    assert float(module.w) == pytest.approx(1.0 - 2 * STEPS * GRAD)  # not the average: the swap is undone


def test_checkpoint_holds_the_average_and_resume_continues_exactly(tmp_path):
    once = Drift()
    _trainer(tmp_path / "a", [TrainableEMA(DECAY)], epochs=2).fit(once, _loader(), _loader())

    first = Drift()
    trainer = _trainer(tmp_path / "b", [TrainableEMA(DECAY)], epochs=1)
    trainer.fit(first, _loader(), _loader())
    path = tmp_path / "b.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert float(saved["state_dict"]["w"]) == pytest.approx(_ema(STEPS))  # what validation measured
    assert float(saved[CURRENT]["w"]) == pytest.approx(1.0 - STEPS * GRAD)
    assert "frozen" not in saved[CURRENT] and float(saved["state_dict"]["frozen"]) == 3.0

    resumed = Drift()
    _trainer(tmp_path / "b", [TrainableEMA(DECAY)], epochs=2).fit(resumed, _loader(), _loader(), ckpt_path=path)
    assert resumed.seen[-1] == pytest.approx(once.seen[-1], abs=1e-6)
    assert float(resumed.w) == pytest.approx(float(once.w), abs=1e-6)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        TrainableEMA(decay)
