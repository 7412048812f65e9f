"""The schedule against plain dense training: log-probs, every parameter gradient, one AdamW step."""

from __future__ import annotations

import pytest
import torch
from dense_reference import adamw_step, dense_entropies, dense_grads, make_batch, rel_err
from tiny_models import CONFIGS, build

from verl_prefix.core import PrefixReuseConfig, attention, compute_log_probs, forward_backward

# name -> (make_batch kwargs, max_tokens_per_micro_batch)
CASES = {
    # groups of every size 1..8, ragged responses; small budget: groups span micro-batches and
    # Phase A runs several prefix chunks
    "group_sizes_1_to_8": (dict(groups=[(g, 9 + g, [1 + (3 * i + g) % 7 for i in range(g)]) for g in range(1, 9)]), 40),
    # one group of 8 spread over many micro-batches
    "group_over_micro_batches": (dict(groups=[(8, 24, [5, 2, 7, 3, 6, 1, 4, 5])]), 12),
    # several groups packed into one micro-batch
    "micro_batch_mixes_groups": (dict(groups=[(3, 10, [2, 4, 3]), (2, 15, [5, 1]), (4, 8, [3, 3, 2, 6])]), None),
    # group 0 diverges after 6 tokens (shorter shared prefix); group 1 shares nothing (runs dense)
    "diverging_prompts": (dict(groups=[(4, 16, [3, 5, 2, 4]), (3, 12, [2, 3, 4])], diverge_at={0: 6, 1: 0}), 20),
    "one_token_responses": (dict(groups=[(5, 14, [1] * 5), (3, 9, [1] * 3)]), 16),
    # rows of one group add different extra prompt tokens: prefix cut before the shortest prompt ends
    "ragged_prompts": (dict(groups=[(4, 12, [3, 2, 4, 1])], prompt_jitter={0: [0, 3, 1, 5]}), 18),
}

FP64_TOL = 1e-10
FP32_TOL = 1e-4


def _reuse_grads(model, batch, config):
    model.zero_grad(set_to_none=True)
    seen: dict[int, torch.Tensor] = {}
    stats = forward_backward(model, batch.input_ids, batch.response_start, batch.group_ids, batch.loss_fn(seen), config)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, [seen[i] for i in range(len(batch.input_ids))], stats


def _assert_equivalent(model, batch, config, tol):
    ref_grads, ref_lps = dense_grads(model, batch)
    grads, lps, stats = _reuse_grads(model, batch, config)
    for i, (a, b) in enumerate(zip(lps, ref_lps, strict=True)):
        assert a.shape == b.shape, f"row {i}"
        assert rel_err(a, b) <= tol, f"log-probs of row {i}: {rel_err(a, b)}"
    for name, ref in ref_grads.items():
        assert grads[name].abs().max() > 0 or ref.abs().max() == 0, name
        assert rel_err(grads[name], ref) <= tol, f"grad {name}: {rel_err(grads[name], ref)}"
    # Parameters after one AdamW step. (The first Adam update is g / (|g| + eps): for entries with
    # |g| near eps it amplifies rounding by ~1/eps, so compare the parameters, not the update.)
    before = dict(model.named_parameters())
    ref_step, step = adamw_step(model, ref_grads), adamw_step(model, grads)
    for name in ref_step:
        assert not torch.equal(ref_step[name], before[name]), f"AdamW did not move {name}"
        assert rel_err(step[name], ref_step[name]) <= tol, f"parameters after AdamW, {name}"
    return stats


@pytest.mark.parametrize("attention", ["merged", "sdpa"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["keep", "offload", "recompute"])
@pytest.mark.parametrize("kind", CONFIGS)
def test_matches_dense_fp64(kind, mode, case, attention):
    spec, budget = CASES[case]
    batch = make_batch(**spec, seed=list(CASES).index(case))
    model = build(kind, torch.float64)
    config = PrefixReuseConfig(max_tokens_per_micro_batch=budget, prefix_activations=mode, attention=attention)
    stats = _assert_equivalent(model, batch, config, FP64_TOL)
    assert stats.rows == len(batch.input_ids)
    assert stats.prefix_tokens + stats.suffix_tokens < stats.dense_tokens or stats.groups == 0


@pytest.mark.parametrize("kind", CONFIGS)
def test_matches_dense_fp32(kind):
    spec, budget = CASES["group_sizes_1_to_8"]
    batch = make_batch(**spec, seed=3)
    model = build(kind, torch.float32)
    _assert_equivalent(model, batch, PrefixReuseConfig(max_tokens_per_micro_batch=budget), FP32_TOL)


@pytest.mark.parametrize("attention", ["merged", "sdpa", "flex"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", CONFIGS)
def test_log_probs_match_dense(kind, case, attention):
    spec, budget = CASES[case]
    batch = make_batch(**spec, seed=7)
    model = build(kind, torch.float64)
    _, ref = dense_grads(model, batch)
    config = PrefixReuseConfig(max_tokens_per_micro_batch=budget, attention=attention, temperature=1.0)
    lps, ents = compute_log_probs(
        model, batch.input_ids, batch.response_start, batch.group_ids, config, return_entropy=True
    )
    for i, (a, b) in enumerate(zip(lps, ref, strict=True)):
        assert rel_err(a, b) <= FP64_TOL, f"row {i}"
        assert not a.requires_grad
    for i, (a, b) in enumerate(zip(ents, dense_entropies(model, batch), strict=True)):
        assert rel_err(a, b) <= FP64_TOL, f"entropies of row {i}"


def test_temperature_and_entropy():
    batch = make_batch(groups=[(3, 10, [4, 2, 5])], seed=11)
    model = build("qwen3", torch.float64)
    temperature = 0.7
    lps, ents = compute_log_probs(
        model,
        batch.input_ids,
        batch.response_start,
        batch.group_ids,
        PrefixReuseConfig(temperature=temperature),
        return_entropy=True,
    )
    with torch.no_grad():
        for i, (row, start) in enumerate(zip(batch.input_ids, batch.response_start, strict=True)):
            logits = model(input_ids=row[None]).logits[0, start - 1 : -1] / temperature
            ref_lp = torch.log_softmax(logits, -1).gather(-1, row[start:, None])[:, 0]
            probs = torch.softmax(logits, -1)
            ref_ent = -(probs * torch.log_softmax(logits, -1)).sum(-1)
            assert rel_err(lps[i], ref_lp) <= FP64_TOL
            assert rel_err(ents[i], ref_ent) <= FP64_TOL


def test_gradients_accumulate_into_existing_grad():
    batch = make_batch(groups=[(4, 12, [3, 2, 4, 1])], seed=5)
    model = build("llama", torch.float64)
    ref, _ = dense_grads(model, batch)
    model.zero_grad(set_to_none=True)
    config = PrefixReuseConfig(max_tokens_per_micro_batch=10)
    for _ in range(2):
        forward_backward(model, batch.input_ids, batch.response_start, batch.group_ids, batch.loss_fn(), config)
    for name, p in model.named_parameters():
        assert rel_err(p.grad, 2 * ref[name]) <= FP64_TOL, name


def test_flash_attn_layout_with_reference_kernel(monkeypatch):
    """The flash-attn path's packing (per-row [prefix ; suffix] keys, cu_seqlens, bottom-right causal).

    flash-attn has no CPU build, so the kernel is replaced by a pure-torch varlen reference with
    flash_attn_varlen_func's contract; everything else is the real flash_attn code path.
    """
    from verl_prefix.core import attention

    def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=True):
        outs = []
        for i in range(len(cu_q) - 1):
            qi = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)[None]
            ki = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1)[None]
            vi = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1)[None]
            nq, nk = qi.shape[2], ki.shape[2]
            mask = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)  # bottom-right causal
            o = torch.nn.functional.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=softmax_scale, enable_gqa=True
            )
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setattr(attention, "_flash_varlen", lambda: varlen_reference)
    monkeypatch.setattr(attention, "check_backend", lambda *a: None)
    from verl_prefix.core import schedule

    monkeypatch.setattr(schedule, "check_backend", lambda *a: None)
    spec, budget = CASES["group_sizes_1_to_8"]
    batch = make_batch(**spec, seed=2)
    model = build("qwen2", torch.float64)
    _assert_equivalent(
        model, batch, PrefixReuseConfig(max_tokens_per_micro_batch=budget, attention="flash_attn"), FP64_TOL
    )


def test_per_row_temperature():
    batch = make_batch(groups=[(3, 10, [4, 2, 5]), (2, 7, [3, 3])], seed=13)
    model = build("qwen3", torch.float64)
    temps = [0.5, 0.9, 1.3, 2.0, 0.7]
    lps = compute_log_probs(model, batch.input_ids, batch.response_start, batch.group_ids, row_temperature=temps)
    with torch.no_grad():
        for i, (row, start) in enumerate(zip(batch.input_ids, batch.response_start, strict=True)):
            logits = model(input_ids=row[None]).logits[0, start - 1 : -1] / temps[i]
            ref = torch.log_softmax(logits, -1).gather(-1, row[start:, None])[:, 0]
            assert rel_err(lps[i], ref) <= FP64_TOL


def test_entropy_bonus_gradient_matches_dense():
    """loss_entropy=True: loss_fn gets per-token entropies with gradient (verl's entropy_coeff)."""
    batch = make_batch(groups=[(4, 12, [3, 2, 4, 1]), (3, 9, [2, 5, 3])], seed=17)
    model = build("qwen3", torch.float64)
    coef = 0.3

    def loss_fn(indices, log_probs, entropies):
        return sum(
            (batch.weights[i] * lp).sum() - coef * ent.sum()
            for i, lp, ent in zip(indices, log_probs, entropies, strict=True)
        )

    model.zero_grad(set_to_none=True)
    for row, start, w in zip(batch.input_ids, batch.response_start, batch.weights, strict=True):
        logits = model(input_ids=row[None]).logits[0, start - 1 : -1]
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)
        ((w * logp.gather(-1, row[start:, None])[:, 0]).sum() - coef * ent.sum()).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    forward_backward(
        model,
        batch.input_ids,
        batch.response_start,
        batch.group_ids,
        loss_fn,
        PrefixReuseConfig(max_tokens_per_micro_batch=12),
        loss_entropy=True,
    )
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref[n]) <= FP64_TOL, n


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_lower_right_causal_bias_path(kind, monkeypatch):
    """On CUDA in bf16/fp16 each row's mask is PyTorch's bottom-right causal bias, so the flash kernel
    runs. Forced here on CPU, where the bias goes through PyTorch's own (materialising) fallback:
    the same schedule code path, exact against dense in fp64. The flash kernel itself: tests/test_gpu.py."""
    calls = []

    def take(*args):
        calls.append(args)
        return True

    monkeypatch.setattr(attention, "_flash_takes_lower_right", take)
    spec, budget = CASES["group_sizes_1_to_8"]
    batch = make_batch(**spec, seed=4)
    config = PrefixReuseConfig(max_tokens_per_micro_batch=budget, attention="sdpa")
    _assert_equivalent(build(kind, torch.float64), batch, config, FP64_TOL)
    assert calls  # the bias path ran
