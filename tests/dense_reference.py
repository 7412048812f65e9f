"""Test batches and the dense reference: `verl_prefix.dense` (the stock model, no schedule code)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from verl_prefix.dense import dense_forward_backward

VOCAB = 97


@dataclass
class Batch:
    input_ids: list[torch.Tensor]
    response_start: list[int]
    group_ids: list[Hashable]
    weights: list[torch.Tensor]  # per response token, like advantages

    def loss_fn(self, seen: dict[int, torch.Tensor] | None = None) -> Callable:
        """loss_fn(indices, log_probs) = sum_k (weights[i_k] * log_probs[k]).sum(); records log-probs."""

        def fn(indices: list[int], log_probs: list[torch.Tensor]) -> torch.Tensor:
            total = 0.0
            for i, lp in zip(indices, log_probs, strict=True):
                if seen is not None:
                    assert i not in seen, f"row {i} passed to loss_fn twice"
                    seen[i] = lp.detach().clone()
                total = total + (self.weights[i].to(lp.dtype) * lp).sum()
            return total

        return fn


def make_batch(
    groups: Sequence[tuple[int, int, Sequence[int]]],
    seed: int = 0,
    diverge_at: dict[int, int] | None = None,
    prompt_jitter: dict[int, Sequence[int]] | None = None,
) -> Batch:
    """groups[g] = (group size, prompt length, response lengths per row).

    diverge_at[g] = k: rows of group g keep the first k prompt tokens and randomise the rest.
    prompt_jitter[g] = extra prompt tokens per row (ragged prompts that share the group prompt).
    """
    gen = torch.Generator().manual_seed(seed)
    rows, starts, gids, weights = [], [], [], []
    for g, (size, prompt_len, resp_lens) in enumerate(groups):
        assert len(resp_lens) == size
        prompt = torch.randint(0, VOCAB, (prompt_len,), generator=gen)
        for i in range(size):
            p = prompt.clone()
            if diverge_at and g in diverge_at:
                k = diverge_at[g]
                p[k:] = torch.randint(0, VOCAB, (prompt_len - k,), generator=gen)
            if prompt_jitter and g in prompt_jitter:
                p = torch.cat([p, torch.randint(0, VOCAB, (prompt_jitter[g][i],), generator=gen)])
            resp = torch.randint(0, VOCAB, (resp_lens[i],), generator=gen)
            rows.append(torch.cat([p, resp]))
            starts.append(len(p))
            gids.append(f"uid-{g}")
            weights.append(torch.randn(resp_lens[i], generator=gen, dtype=torch.float64))
    return Batch(rows, starts, gids, weights)


def _one_row_each(batch: Batch) -> list[list[int]]:
    # Unpadded rows, as verl's packed layout runs them: a padded batch would send a non-finite
    # gradient into masked (padding, future) keys through 0 * inf in the softmax backward.
    return [[i] for i in range(len(batch.input_ids))]


def dense_log_probs(model: torch.nn.Module, batch: Batch, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-row response log-probs from the stock forward (no backward)."""
    rows, starts = batch.input_ids, batch.response_start
    with torch.no_grad():
        return dense_forward_backward(model, rows, starts, partition=_one_row_each(batch), temperature=temperature)[0]


def dense_entropies(model: torch.nn.Module, batch: Batch, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-row entropies of the tempered next-token distribution at the response positions."""
    rows, starts = batch.input_ids, batch.response_start
    with torch.no_grad():
        out = dense_forward_backward(
            model, rows, starts, partition=_one_row_each(batch), temperature=temperature, entropy=True
        )
    return out[1]


def shared_response_batch(seed: int = 1) -> Batch:
    """Rows that share response tokens (the loss-carrying spans of tree rollouts and multi-turn rows).

    uid "tree": five samples of one prompt that share a 6-token first turn; rows 0-2 share 4 more
    tokens, rows 1 and 2 are identical (duplicate samples), row 3's response is the start of row 4's.
    uid "turn1" / "turn2": a multi-turn trajectory and its second turn trained as a row of its own
    (its prompt holds the first row's prompt and first turn, so the shared span has members with
    different response starts). uid "plain": two samples sharing their prompt only.
    """
    gen = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(0, VOCAB, (n,), generator=gen)

    prompt, turn, stem = tokens(8), tokens(6), tokens(4)
    twin = tokens(3)
    longer = tokens(7)
    tree = [
        (prompt, torch.cat([turn, stem, tokens(2)])),
        (prompt, torch.cat([turn, stem, twin])),
        (prompt, torch.cat([turn, stem, twin])),
        (prompt, torch.cat([turn, longer[:3]])),
        (prompt, torch.cat([turn, longer])),
    ]
    question, first_turn = tokens(7), tokens(5)
    turns = [
        ("turn1", question, torch.cat([first_turn, tokens(4)])),
        ("turn2", torch.cat([question, first_turn]), tokens(3)),
    ]
    plain = tokens(6)
    rows = [("tree", p, r) for p, r in tree] + turns + [("plain", plain, tokens(n)) for n in (3, 5)]
    return Batch(
        [torch.cat([p, r]) for _, p, r in rows],
        [len(p) for _, p, _ in rows],
        [uid for uid, _, _ in rows],
        [torch.randn(len(r), generator=gen, dtype=torch.float64) for _, _, r in rows],
    )


def dense_values(model: torch.nn.Module, batch: Batch) -> list[torch.Tensor]:
    """Per-row values of a one-label value model, each row alone (response token t's at position t - 1)."""
    return [
        model(input_ids=row[None]).logits[0, start - 1 : -1, 0]
        for row, start in zip(batch.input_ids, batch.response_start, strict=True)
    ]


def dense_grads(model: torch.nn.Module, batch: Batch) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Gradients of the batch loss from dense training (each row its own micro-batch, unpadded), and
    the log-probs it saw."""
    model.zero_grad(set_to_none=True)
    rows, starts = batch.input_ids, batch.response_start
    log_probs, _, _ = dense_forward_backward(model, rows, starts, batch.loss_fn(), partition=_one_row_each(batch))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, log_probs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (0 when both are zero)."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def adamw_step(model: torch.nn.Module, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters after one AdamW step from `grads`, on a copy of `model`."""
    clone = copy.deepcopy(model)
    for n, p in clone.named_parameters():
        p.grad = grads[n].clone()
    torch.optim.AdamW(clone.parameters(), lr=1e-2, weight_decay=0.1).step()
    return {n: p.detach().clone() for n, p in clone.named_parameters()}


def dense_moe_grads(
    model: torch.nn.Module, batch: Batch, micro_batches: Sequence[Sequence[int]], coef: float
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Dense training with the router aux loss: per micro-batch (rows with their full prompts, right
    padded, attention_mask), loss_fn + coef * transformers' load_balancing_loss_func (the model's
    own `aux_loss` output). Returns the gradients and each micro-batch's aux loss."""
    model.zero_grad(set_to_none=True)
    rows, starts = batch.input_ids, batch.response_start
    _, _, aux = dense_forward_backward(
        model, rows, starts, batch.loss_fn(), partition=micro_batches, router_aux_loss_coef=coef
    )
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, aux
