"""Value-model readout (verl's critic): values and gradients equal dense per-row training."""

import pytest
import torch
from dense_reference import dense_values, make_batch, rel_err
from tiny_models import build_value_model

from verl_prefix.core import PrefixReuseConfig, compute_values, forward_backward


@pytest.mark.parametrize("mode", ["keep", "offload", "recompute"])
@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_value_model_matches_dense(kind, mode):
    batch = make_batch(groups=[(4, 14, [3, 5, 2, 4]), (1, 6, [3]), (3, 9, [2, 1, 6])], seed=21)
    model = build_value_model(kind)
    returns = [torch.randn(len(w), dtype=torch.float64) for w in batch.weights]

    def loss_fn(indices, values):
        return sum(((v - returns[i]) ** 2).sum() for i, v in zip(indices, values, strict=True))

    model.zero_grad(set_to_none=True)
    ref_values = dense_values(model, batch)
    loss_fn(list(range(len(ref_values))), ref_values).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    config = PrefixReuseConfig(max_tokens_per_micro_batch=14, prefix_activations=mode)
    forward_backward(model, batch.input_ids, batch.response_start, batch.group_ids, loss_fn, config, readout="values")
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref[n]) <= 1e-10, n
    values = compute_values(model, batch.input_ids, batch.response_start, batch.group_ids, config)
    for v, r in zip(values, ref_values, strict=True):
        assert rel_err(v, r.detach()) <= 1e-10


def test_value_readout_needs_value_model():
    from tiny_models import build

    with pytest.raises(ValueError, match="token-classification value model"):
        compute_values(build("qwen3"), [torch.arange(1, 9)], [4], [0])
