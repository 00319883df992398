"""Linear probes (analyses/probes.py): held-out accuracy and the weight's direction on synthetic activations."""

import pytest
import torch

from analyses.probes import linear_probe, pool_by_completion

N, D = 40, 32


def _unit(seed: int) -> torch.Tensor:
    vector = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()


def _base(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(seed))


def test_pooling_averages_each_completions_tokens():
    states = torch.arange(12, dtype=torch.float32).view(1, 6, 2)  # one layer, 6 tokens, d = 2
    pooled = pool_by_completion(states, torch.tensor([0, 0, 1, 1, 1, 2]), 3)
    assert pooled.tolist() == [[[1.0, 2.0], [6.0, 7.0], [10.0, 11.0]]]


def test_a_shift_along_v_is_found_and_points_along_v():
    v = _unit(1)
    probe = linear_probe(_base(), _base() + 3.0 * v, v)
    assert probe["accuracy"] >= 0.85 and probe["cos_vector"] > 0.6


def test_a_shift_across_v_is_found_but_does_not_point_along_v():
    v, w = _unit(1), _unit(2)
    w = w - (w @ v) * v
    probe = linear_probe(_base(), _base() + 3.0 * w / w.norm(), v)
    assert probe["accuracy"] >= 0.85 and abs(probe["cos_vector"]) < 0.3


def test_no_change_in_distribution_is_invisible():
    probe = linear_probe(_base(0), _base(1), _unit(1))
    assert 0.2 <= probe["accuracy"] <= 0.8


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="paired rows"):
        linear_probe(_base()[:1], _base()[:1], _unit(1))
