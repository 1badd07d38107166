"""The zoo builds offline, runs forward and backward, and its tied parameters really are one tensor."""

from __future__ import annotations

import pytest
import torch

from tests.zoo.models import ZOO, ZooEntry, build, logits_of, loss_of


@pytest.mark.parametrize("entry", ZOO, ids=[entry.name for entry in ZOO])
def test_zoo_model_runs_and_trains(entry: ZooEntry) -> None:
    model = build(entry.name).train()
    batch = entry.batch(0)
    loss = loss_of(entry, model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(logits_of(build(entry.name)(**batch[0])), logits_of(build(entry.name)(**batch[0])))
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for first, second in entry.tied:
        assert parameters[first] is parameters[second]
