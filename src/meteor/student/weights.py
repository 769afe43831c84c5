"""A cheap fingerprint of the student's trainable weights, to prove that training changed them."""

from __future__ import annotations


def weight_fingerprint(model) -> list[tuple[float, float]]:
    """(sum, norm) of every trainable tensor, in float64: cheap, and any optimiser step with a
    non-zero learning rate changes it (an update that leaves it equal trained nothing)."""
    return [(float(p.detach().double().sum()), float(p.detach().double().norm()))
            for p in model.parameters() if p.requires_grad]
