"""probes: can a linear probe still tell the healed model's activations from the base's, and along what?

Per band layer, a cross-validated logistic regression (scikit-learn) separates the base's hidden state from the
steered or healed model's on the same completions (each completion's states mean-pooled over its tokens, so a
sample is one completion). Folds group by completion: a completion's base and changed states are always on the
same side of the split, so the probe cannot match the two by their content. Reported: held-out accuracy (0.5 =
the change is invisible to a linear readout) and the cosine of the probe's weight, fitted on every completion,
with the steering vector at that layer (near 1: the model still differs from the base along the trait direction
and not along others). `diffs` calls it for every round; the round page shows it.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score

MAX_FOLDS = 5


def pool_by_completion(states: torch.Tensor, completion: torch.Tensor, n_completions: int) -> torch.Tensor:
    """Mean over each completion's tokens: [L, n_tok, d] with each token's completion index -> [L, n, d]."""
    sums = torch.zeros(states.shape[0], n_completions, states.shape[-1], dtype=states.dtype)
    sums.index_add_(1, completion, states)
    counts = torch.bincount(completion, minlength=n_completions).clamp(min=1).to(states.dtype)
    return sums / counts[None, :, None]


def linear_probe(base: torch.Tensor, changed: torch.Tensor, direction: torch.Tensor, seed: int = 0) -> dict:
    """Held-out accuracy of base [n, d] vs changed [n, d] (row i of both = completion i), and the cosine of the
    probe's weight with `direction`. Needs n >= 2."""
    n = base.shape[0]
    if n < 2 or changed.shape != base.shape:
        raise ValueError(f"linear_probe needs >= 2 paired rows of equal shape, got {tuple(base.shape)} and "
                         f"{tuple(changed.shape)}")  # fmt: skip
    features = torch.cat([base, changed]).double().numpy()
    labels = np.repeat([0, 1], n)
    groups = np.tile(np.arange(n), 2)
    probe = LogisticRegression(max_iter=2000, random_state=seed)
    folds = GroupKFold(n_splits=min(MAX_FOLDS, n))
    accuracy = cross_val_score(probe, features, labels, groups=groups, cv=folds)
    weight = torch.from_numpy(probe.fit(features, labels).coef_[0])
    cosine = torch.nn.functional.cosine_similarity(weight, direction.double(), dim=0)
    return {"accuracy": float(accuracy.mean()), "accuracy_sd": float(accuracy.std()), "cos_vector": float(cosine)}
