"""Property-based equivalence: random batch structures through the schedule vs dense training.

Structures: group sizes 1..16, ragged prompts and responses, rows of one uid whose prompts
diverge, a system prompt shared by several groups (nested sharing), responses that share a stem
and sub-stems (tree rollouts), duplicate rows, rows whose prompt takes in the start of their
response (a later turn of a multi-turn trajectory), rows shuffled so a group is not contiguous,
groups split across micro-batches (small token budgets) and across dp ranks (the rows split over
several schedule calls whose gradients add, as FSDP's reduction does).
Training: merged or SDPA attention, every prefix_activations mode, gradient checkpointing off /
reentrant / non-reentrant; forward-only: merged, SDPA and FlexAttention. One prefix per uid, or the
prefix tree found from the tokens (system prompt, then each group's prompt, then diverging and
ragged rows' own spans, then shared response stems: up to six levels), with every node kept or
the default `min_node_saving`.

Profiles: `ci` (default, 40 examples, derandomized) and `long` (500 examples):
`HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from dense_reference import VOCAB, Batch, dense_grads, dense_log_probs, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import CONFIGS, build

from verl_prefix.core import PrefixReuseConfig, compute_log_probs, forward_backward

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TOL = 1e-10  # fp64, HF's fp32 casts patched out (tiny_models.keep_input_dtype)
MAX_ROWS = 24


@dataclass
class Structure:
    kind: str
    system_len: int  # tokens shared by every group's prompt (0: none)
    groups: list[tuple[int, int, list[int], list[int], int | None]]  # size, prompt len, responses, jitter, diverge
    shuffle_seed: int | None
    ranks: int
    budget: int | None  # suffix tokens per micro-batch, or None (no limit)
    mode: str
    checkpointing: str | None  # None, "reentrant" or "non_reentrant"
    attention: str  # the schedule's backend under test: "merged" or its reference "sdpa"
    tree: bool  # PrefixReuseConfig.prefix_tree: nodes from the tokens across uids (system, prompt, ...)
    min_node_saving: int  # PrefixReuseConfig.min_node_saving: 0 keeps every node of the tree
    response_stem: int  # leading response tokens a group's rows share (a tree rollout; 0: none)
    sub_stem: bool  # every other row of a group shares 2 more response tokens after the stem
    twins: bool  # every third row repeats the row before it (a duplicate sample)
    turn_shift: int  # every third row's response starts this many tokens later (a later turn's row)
    seed: int


@st.composite
def structures(draw) -> Structure:
    groups, rows = [], 0
    for _ in range(draw(st.integers(1, 4))):
        size = draw(st.integers(1, min(16, MAX_ROWS - rows)))
        prompt_len = draw(st.integers(1, 16))
        responses = draw(st.lists(st.integers(1, 8), min_size=size, max_size=size))
        ragged = draw(st.booleans())
        jitter = draw(st.lists(st.integers(0, 3), min_size=size, max_size=size)) if ragged else [0] * size
        diverge = draw(st.one_of(st.none(), st.integers(0, prompt_len)))
        groups.append((size, prompt_len, responses, jitter, diverge))
        rows += size
        if rows >= MAX_ROWS:
            break
    budget = draw(st.one_of(st.none(), st.integers(1, 64)))
    return Structure(
        kind=draw(st.sampled_from(sorted(CONFIGS))),
        system_len=draw(st.sampled_from([0, 0, 5, 12])),
        groups=groups,
        shuffle_seed=draw(st.one_of(st.none(), st.integers(0, 2**16))),
        ranks=draw(st.integers(1, 3)),
        budget=budget,
        mode=draw(st.sampled_from(["keep", "offload", "recompute"])),
        checkpointing=draw(st.sampled_from([None, "reentrant", "non_reentrant"])),
        attention=draw(st.sampled_from(["merged", "sdpa"])),
        tree=draw(st.booleans()),
        min_node_saving=draw(st.sampled_from([0, 0, 256])),
        response_stem=draw(st.sampled_from([0, 0, 2, 5])),
        sub_stem=draw(st.booleans()),
        twins=draw(st.booleans()),
        turn_shift=draw(st.integers(0, 2)),
        seed=draw(st.integers(0, 2**16)),
    )


def make(structure: Structure) -> Batch:
    gen = torch.Generator().manual_seed(structure.seed)
    system = torch.randint(0, VOCAB, (structure.system_len,), generator=gen)
    rows, starts, gids, weights = [], [], [], []
    for g, (size, prompt_len, responses, jitter, diverge) in enumerate(structure.groups):
        prompt = torch.randint(0, VOCAB, (prompt_len,), generator=gen)
        stem = torch.randint(0, VOCAB, (structure.response_stem + 2,), generator=gen)
        for i in range(size):
            if structure.twins and i % 3 == 2:  # the row before it again (same uid)
                rows.append(rows[-1].clone())
                starts.append(starts[-1])
                gids.append(f"uid-{g}")
                weights.append(torch.randn(len(weights[-1]), generator=gen, dtype=torch.float64))
                continue
            p = prompt.clone()
            if diverge is not None and i % 2 == 1:  # every other row's prompt leaves the group's at `diverge`
                p[diverge:] = torch.randint(0, VOCAB, (prompt_len - diverge,), generator=gen)
            p = torch.cat([system, p, torch.randint(0, VOCAB, (jitter[i],), generator=gen)])
            response = torch.randint(0, VOCAB, (responses[i],), generator=gen)
            shared = structure.response_stem + (2 if structure.sub_stem and i % 2 == 1 else 0)
            response[:shared] = stem[: min(shared, responses[i])]
            shift = min(structure.turn_shift if i % 3 == 1 else 0, responses[i] - 1)
            rows.append(torch.cat([p, response]))
            starts.append(len(p) + shift)
            gids.append(f"uid-{g}")
            weights.append(torch.randn(responses[i] - shift, generator=gen, dtype=torch.float64))
    order = list(range(len(rows)))
    if structure.shuffle_seed is not None:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(structure.shuffle_seed)).tolist()
    return Batch(
        [rows[i] for i in order], [starts[i] for i in order], [gids[i] for i in order], [weights[i] for i in order]
    )


@functools.cache
def model(kind: str) -> torch.nn.Module:
    return build(kind, torch.float64)


def budget_for(structure: Structure, batch: Batch) -> int | None:
    """The drawn budget, raised to the longest row: a row that shares nothing runs whole in Phase B,
    and a Phase-B sequence longer than the budget is an error by contract (as in verl)."""
    if structure.budget is None:
        return None
    return max(structure.budget, max(len(r) for r in batch.input_ids))


def grad_err(grad: torch.Tensor, ref: torch.Tensor, scale: float) -> float:
    """max|grad - ref| / max|ref|, with max|ref| floored at 1e-4 of the largest gradient: a weight
    whose exact gradient is zero (a one-token prompt's q_proj) carries rounding of up to ~1e-16 of
    the largest gradient in both runs (seen with Qwen3-MoE), so such weights are held to an absolute
    1e-14 of it."""
    return (grad - ref).abs().max().item() / max(ref.abs().max().item(), 1e-4 * scale)


@given(structures())
def test_training_matches_dense(structure: Structure):
    batch = make(structure)
    net = model(structure.kind)
    ref_grads, ref_lps = dense_grads(net, batch)
    config = PrefixReuseConfig(
        max_tokens_per_micro_batch=budget_for(structure, batch),
        prefix_activations=structure.mode,
        attention=structure.attention,
        prefix_tree=structure.tree,
        min_node_saving=structure.min_node_saving,
    )
    seen: dict[int, torch.Tensor] = {}
    net.zero_grad(set_to_none=True)
    if structure.checkpointing is not None:
        use_reentrant = structure.checkpointing == "reentrant"
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    try:
        _reuse_over_ranks(net, batch, config, structure.ranks, seen)
    finally:
        net.gradient_checkpointing_disable()
    n = len(batch.input_ids)
    grads = {name: p.grad.detach().clone() for name, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    assert sorted(seen) == list(range(n))
    for i in range(n):
        assert rel_err(seen[i], ref_lps[i]) <= TOL, f"log-probs of row {i}"
    scale = max(ref.abs().max().item() for ref in ref_grads.values())
    for name, ref in ref_grads.items():
        err = grad_err(grads[name], ref, scale)
        assert err <= TOL, f"grad {name}: {err:.2e}"


def _reuse_over_ranks(net, batch: Batch, config: PrefixReuseConfig, ranks: int, seen: dict[int, torch.Tensor]) -> None:
    """The schedule over the rows split across `ranks` calls (rank r holds rows r, r + ranks, ...);
    gradients add as FSDP's reduction adds them. Records each row's log-probs into `seen`."""
    n = len(batch.input_ids)
    for rank in range(ranks):  # rank r holds rows r, r + ranks, ...; gradients add
        mine = list(range(rank, n, ranks))
        if not mine:
            continue
        local_seen: dict[int, torch.Tensor] = {}
        fn = batch.loss_fn()

        def loss_fn(indices, log_probs, mine=mine, fn=fn, local_seen=local_seen):
            for i, lp in zip(indices, log_probs, strict=True):
                local_seen[mine[i]] = lp.detach()
            return fn([mine[i] for i in indices], log_probs)

        forward_backward(
            net,
            [batch.input_ids[i] for i in mine],
            [batch.response_start[i] for i in mine],
            [batch.group_ids[i] for i in mine],
            loss_fn,
            config,
        )
        seen.update(local_seen)


@given(structures(), st.sampled_from(["merged", "sdpa", "flex"]))
def test_log_probs_match_dense(structure: Structure, attention: str):
    batch = make(structure)
    net = model(structure.kind)
    with torch.no_grad():
        ref_lps = dense_log_probs(net, batch)
        config = PrefixReuseConfig(
            max_tokens_per_micro_batch=budget_for(structure, batch),
            attention=attention,
            prefix_tree=structure.tree,
            min_node_saving=structure.min_node_saving,
        )
        lps = compute_log_probs(net, batch.input_ids, batch.response_start, batch.group_ids, config)
    tol = TOL if attention != "flex" else 1e-6  # flex on CPU computes in fp32 internally
    for i, (a, b) in enumerate(zip(lps, ref_lps, strict=True)):
        assert a.shape == b.shape
        assert rel_err(a, b) <= tol, f"row {i}: {rel_err(a, b):.2e}"
