"""Runs stage 3's CLI in a subprocess with one extra test reward: the character length of the
completion, which varies even for a random tiny model, so advantages are non-zero.

FSDP runs here on CPU over gloo, standing in for GPUs over NCCL: Lightning refuses FSDP without a
GPU, and torch's FSDP needs to be told the device when it is the CPU. Both refusals are lifted for
the test; everything else (wrapping, sharding, gathers, sharded checkpoints) is the production path.
"""

import torch
from lightning.fabric import connector
from lightning.fabric.strategies import FSDPStrategy
from torch.distributed.fsdp import fully_sharded_data_parallel

import rewards
from train_grpo_softmask import main


def completion_chars(prompts, completions, **_):
    return [len(c) / 100 for c in completions]


def allow_fsdp_on_cpu() -> None:
    check = connector._Connector._check_strategy_and_fallback
    init_device = fully_sharded_data_parallel._init_device_handle

    def check_as_if_on_gpu(self):
        flag = self._accelerator_flag
        fsdp = isinstance(self._strategy_flag, FSDPStrategy) or self._strategy_flag == "fsdp"
        if fsdp and flag == "cpu":
            self._accelerator_flag = "cuda"
        try:
            check(self)
        finally:
            self._accelerator_flag = flag

    def cpu_device(state, module, ignored_params, device_id):
        return init_device(state, module, ignored_params, torch.device("cpu") if device_id is None else device_id)

    connector._Connector._check_strategy_and_fallback = check_as_if_on_gpu
    fully_sharded_data_parallel._init_device_handle = cpu_device


rewards.REWARDS["completion_chars"] = completion_chars

if __name__ == "__main__":
    allow_fsdp_on_cpu()
    main()
