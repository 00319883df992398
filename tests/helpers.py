"""Reference implementations the library is checked against (plain PyTorch, no nnsight)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from interp_heal.architecture import decoder_layers
from interp_heal.sequences import continuation_logprobs, pad_left


@contextmanager
def hook_steering(model: nn.Module, injection: dict[int, torch.Tensor], generated_only: bool = False) -> Iterator[None]:
    """Add injection[l] to decoder block l's output with plain forward hooks.

    generated_only: skip the prompt forward (sequence length > 1) and steer single-token decode steps.
    """

    def make_hook(delta: torch.Tensor):
        def hook(_module, _inputs, output):
            if generated_only and output.shape[1] > 1:
                return output
            return output + delta

        return hook

    layers = decoder_layers(model)
    handles = [layers[layer].register_forward_hook(make_hook(delta)) for layer, delta in injection.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what nnsight and HF generate use)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
                  "--v=0", "--virtual-time-budget=10000", "--window-size=1600,2000")  # fmt: skip


def load_in_chromium(page: Path, screenshot: Path) -> tuple[list[str], str]:
    """Load a page in headless Chromium: (JavaScript errors from its console, the rendered DOM); also writes a
    screenshot. Errors are the console lines Chromium logs for uncaught exceptions and error objects."""
    runs = [
        subprocess.run(["chromium", *CHROMIUM_FLAGS, *extra, page.as_uri()], capture_output=True, text=True,
                       timeout=300, check=True)
        for extra in ([f"--screenshot={screenshot}"], ["--dump-dom"])
    ]  # fmt: skip
    console = [line for run in runs for line in run.stderr.splitlines() if ":CONSOLE" in line]
    errors = [line for line in console if "Uncaught" in line or "Error" in line]
    return errors, runs[1].stdout


def teach(
    model: nn.Module, tokenizer, prompts: list[list[int]], replies: list[list[int]], steps: int = 60
) -> nn.Module:
    """Train a tiny model a few full-parameter steps to write `replies[i]` after the chat prompt `prompts[i]`
    (token ids), so a readout has something real to find; returned in eval mode."""
    batch = pad_left(prompts, replies, tokenizer.pad_token_id, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = -torch.cat(continuation_logprobs(model(**batch.model_inputs()).logits, batch)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
