"""CUDA-only checks (skipped without a GPU; CI has none): the schedule on CUDA against dense
training, FlexAttention's training path (its backward has no CPU kernel), and bf16.

Run on a GPU machine: `python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import tiny_models
import torch
from dense_reference import dense_grads, make_batch, rel_err
from tiny_models import build

from verl_prefix.core import PrefixReuseConfig, compute_log_probs, forward_backward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GROUPS = [(8, 40, [5, 9, 3, 12, 7, 4, 6, 8]), (3, 25, [4, 6, 2]), (1, 10, [3])]


def build_cuda(kind: str, attention: str, dtype: torch.dtype) -> torch.nn.Module:
    """The tiny test model on CUDA; FlexAttention's Triton kernels need head_dim >= 16."""
    if attention != "flex":
        return build(kind, dtype).cuda()
    original = tiny_models.CONFIGS[kind]

    def wide_heads():
        config = original()
        config.head_dim = 16
        return config

    tiny_models.CONFIGS[kind] = wide_heads
    try:
        return build(kind, dtype).cuda()
    finally:
        tiny_models.CONFIGS[kind] = original


def on_cuda(batch):
    batch.input_ids = [r.cuda() for r in batch.input_ids]
    batch.weights = [w.cuda() for w in batch.weights]
    return batch


def reuse_grads(model, batch, config):
    model.zero_grad(set_to_none=True)
    forward_backward(model, batch.input_ids, batch.response_start, batch.group_ids, batch.loss_fn(), config)
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("mode", ["keep", "offload", "recompute"])
@pytest.mark.parametrize(
    "kind,attention", [("qwen3", "sdpa"), ("llama", "sdpa"), ("qwen3_moe", "sdpa"), ("qwen3", "flex")]
)
def test_training_matches_dense_fp32(kind, attention, mode):
    model = build_cuda(kind, attention, torch.float32)
    batch = on_cuda(make_batch(GROUPS, seed=5))
    ref, ref_lps = dense_grads(model, batch)
    config = PrefixReuseConfig(max_tokens_per_micro_batch=48, attention=attention, prefix_activations=mode)
    grads = reuse_grads(model, batch, config)
    worst = max(rel_err(grads[n], ref[n].float()) for n in ref)
    assert worst < 1e-4, worst
    with torch.no_grad():
        lps = compute_log_probs(model, batch.input_ids, batch.response_start, batch.group_ids, config)
    assert max(rel_err(a, b) for a, b in zip(lps, ref_lps, strict=True)) < 1e-4


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_bf16_close_to_dense(attention):
    """bf16 rounds differently on the two paths; the gradients must agree to bf16 accuracy."""
    model = build_cuda("qwen3", attention, torch.bfloat16)
    batch = on_cuda(make_batch(GROUPS, seed=6))
    ref, _ = dense_grads(model, batch)
    grads = reuse_grads(model, batch, PrefixReuseConfig(max_tokens_per_micro_batch=48, attention=attention))
    errs = {n: rel_err(grads[n], ref[n].float()) for n in ref}
    median = sorted(errs.values())[len(errs) // 2]
    print(f"bf16 {attention}: max grad rel err {max(errs.values()):.2e}, median {median:.2e}")
    assert max(errs.values()) < 5e-2


def test_bf16_prefix_rows_take_the_flash_kernel():
    """A suffix row over [prefix ; own] keys (GQA, bf16) qualifies for flash with the bottom-right
    causal bias, so the sdpa path needs no mask tensor."""
    from verl_prefix.core import attention

    q = torch.randn(1, 8, 5, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 37, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert attention._flash_takes_lower_right(q, k, v, 0.0)
    assert not attention._flash_takes_lower_right(q.float(), k.float(), v.float(), 0.0)  # fp32: boolean mask
