"""Data-parallel heal through accelerate: one process unless started by `accelerate launch` or `torchrun`.

Each optimizer step takes `grad_accum * world` micro-batches from the same seeded order on every process;
process r trains on micro-batches r, r + world, ... and DDP averages the gradients. Every micro-batch is
weighted 1 / (micro-batches in the step), so a step on N processes is the same step as one process with
`grad_accum * N` (tested against each other in tests/test_parallel.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn


@dataclass(frozen=True)
class DataParallel:
    accelerator: Accelerator | None = None

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str | None:
        """The device this process must load the model on (None: the config decides)."""
        return str(self.accelerator.device) if self.accelerator else None

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run training forwards through (DDP-wrapped when there are several processes)."""
        return self.accelerator.prepare_model(model) if self.accelerator else model

    @contextmanager
    def gradient_sync(self, forward_module: nn.Module, sync: bool) -> Iterator[None]:
        """Let DDP all-reduce gradients only on a process's last micro-batch of a step."""
        with nullcontext() if sync or self.accelerator is None else self.accelerator.no_sync(forward_module):
            yield

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values, reduction="sum") if self.accelerator else values

    def wait(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()


def data_parallel() -> DataParallel:
    """Several processes when a launcher set WORLD_SIZE > 1 (gloo on CPU, NCCL on GPUs), else one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DataParallel()
    return DataParallel(Accelerator(cpu=not torch.cuda.is_available()))


def share_of_step(n_micro: int, world: int, rank: int) -> list[int]:
    """Indices (within a step's micro-batches) this process trains on: r, r + world, ..."""
    return list(range(rank, n_micro, world))
