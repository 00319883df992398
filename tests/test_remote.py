"""The steering traces through nnsight's simulation of remote (NDIF) execution.

`remote="local"` serializes each trace as it would be sent to NDIF, deserializes it with this project's modules
hidden (a server never installed them) and runs it. Equal results to local tracing mean the intervention code
ships by value and runs there; a real server (network, API key, hosted weights) is not tested here.
"""

import pytest
import torch

from interp_heal.personas import BUILTIN_AXES, context_prompts, render_prompts, task_prompts
from interp_heal.steer import extract_steering_vector, steered_generate, steered_logits, tokenize_prompts

CPU = torch.device("cpu")


@pytest.fixture
def serialized_requests(monkeypatch):
    """Counts the requests nnsight serializes, so a test can tell the remote path from a silent local run."""
    from nnsight.schema.request import RequestModel

    calls = []
    serialize = RequestModel.serialize

    def counting(*args, **kwargs):
        calls.append(1)
        return serialize(*args, **kwargs)

    monkeypatch.setattr(RequestModel, "serialize", counting)
    return calls


def _inputs(tokenizer):
    return dict(tokenize_prompts(tokenizer, render_prompts(tokenizer, task_prompts(3)), CPU))


def test_extraction_through_the_simulated_server_equals_local(tiny_model, tokenizer, serialized_requests):
    pair, contexts = BUILTIN_AXES["love"], context_prompts(4, seed=1)
    local = extract_steering_vector(tiny_model, tokenizer, pair, contexts, (0.25, 0.75), batch_size=4)
    assert not serialized_requests, "a local run must not serialize anything"
    remote = extract_steering_vector(tiny_model, tokenizer, pair, contexts, (0.25, 0.75), batch_size=4,
                                     remote="local")  # fmt: skip
    assert len(serialized_requests) == 2, "one request per persona batch"
    assert torch.equal(remote.directions, local.directions)


def test_steered_logits_and_generation_through_the_simulated_server_equal_local(
    tiny_model, tokenizer, serialized_requests
):
    pair, contexts = BUILTIN_AXES["love"], context_prompts(4, seed=1)
    vector = extract_steering_vector(tiny_model, tokenizer, pair, contexts, (0.25, 0.75), batch_size=4)
    inputs = _inputs(tokenizer)
    with torch.inference_mode():
        local_logits = steered_logits(tiny_model, tokenizer, inputs, vector, 4.0)
        remote_logits = steered_logits(tiny_model, tokenizer, inputs, vector, 4.0, remote="local")
    assert torch.equal(remote_logits, local_logits)
    generate = {"max_new_tokens": 6, "do_sample": False}
    for coeff in (4.0, [0.0, 4.0, -4.0], 0.0):  # one dose, a dose per row, and unsteered
        local = steered_generate(tiny_model, tokenizer, inputs, vector, coeff, **generate)
        remote = steered_generate(tiny_model, tokenizer, inputs, vector, coeff, remote="local", **generate)
        assert torch.equal(remote, local), coeff
    assert len(serialized_requests) == 4
