"""Plain dense training of the same rows: one stock HF forward per row, no schedule code involved."""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

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


def dense_log_probs(model: torch.nn.Module, batch: Batch, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-row response log-probs from a stock forward (grad enabled if the caller allows)."""
    out = []
    for row, start in zip(batch.input_ids, batch.response_start, strict=True):
        logits = model(input_ids=row[None], use_cache=False).logits[0, start - 1 : -1]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        out.append(torch.log_softmax(logits / temperature, dim=-1).gather(-1, row[start:, None])[:, 0])
    return out


def dense_entropies(model: torch.nn.Module, batch: Batch, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-row entropies of the tempered next-token distribution at the response positions."""
    out = []
    with torch.no_grad():
        for row, start in zip(batch.input_ids, batch.response_start, strict=True):
            logits = model(input_ids=row[None], use_cache=False).logits[0, start - 1 : -1] / temperature
            out.append(-(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1))
    return out


def dense_grads(model: torch.nn.Module, batch: Batch) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Gradients of the batch loss from dense per-row training, and the log-probs it saw."""
    model.zero_grad(set_to_none=True)
    log_probs = dense_log_probs(model, batch)
    batch.loss_fn()(list(range(len(log_probs))), log_probs).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, [lp.detach() for lp in log_probs]


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
    aux_values = []
    for rows in micro_batches:
        width = max(len(batch.input_ids[r]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, : len(batch.input_ids[r])] = batch.input_ids[r]
            mask[k, : len(batch.input_ids[r])] = 1
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
        log_probs = []
        for k, r in enumerate(rows):
            start, n = batch.response_start[r], len(batch.input_ids[r])
            logits = out.logits[k, start - 1 : n - 1]
            log_probs.append(torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[r][start:, None])[:, 0])
        aux_values.append(out.aux_loss.item())
        (batch.loss_fn()(list(rows), log_probs) + coef * out.aux_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, aux_values
