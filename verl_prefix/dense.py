"""Plain dense training of the same rows: the reference the schedule is tested and measured against.

Rows run as right-padded micro-batches through the unmodified model (its own attention, no schedule
code), and each micro-batch's loss is backpropagated, as a dense trainer does. The response
positions of all rows of a micro-batch are read with one gather, so the backward writes the logits
gradient once per micro-batch, not once per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .core import token_log_probs
from .core.plan import pack_in_order

LOGITS = ("all", "response")


def micro_batches(lengths: Sequence[int], max_tokens: int | None) -> list[list[int]]:
    """Consecutive rows packed greedily under `max_tokens` (a longer row goes alone); None = one."""
    return pack_in_order(list(enumerate(lengths)), max_tokens)


def dense_forward_backward(
    model: torch.nn.Module,
    rows: Sequence[torch.Tensor],
    starts: Sequence[int],
    loss_fn: Callable[[list[int], list[torch.Tensor]], torch.Tensor] | None = None,
    max_tokens: int | None = None,
    *,
    partition: Sequence[Sequence[int]] | None = None,
    temperature: float = 1.0,
    logits: str = "all",
    entropy: bool = False,
    router_aux_loss_coef: float | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[float]]:
    """Dense forward (and, with `loss_fn`, backward) of every row.

    Args:
        rows / starts: 1-D token rows and each row's first response token.
        loss_fn: loss_fn(indices, log_probs) per micro-batch, backpropagated; None = forward only.
        max_tokens: token budget of a micro-batch (`micro_batches`); `partition` gives them instead.
        logits: "all" runs the lm_head at every position (verl's engines do); "response" only over
            the span holding the response positions (`logits_to_keep`), the cheapest dense baseline.
        entropy: also return per-token entropies of the tempered distribution.
        router_aux_loss_coef: MoE: add coef x the model's own `aux_loss` (transformers'
            `load_balancing_loss_func` over the micro-batch's real tokens) to each micro-batch's loss.

    Returns (log-probs per row, entropies per row or None, aux loss per micro-batch), detached.
    """
    if logits not in LOGITS:
        raise ValueError(f"dense logits={logits!r} is unknown; use one of {LOGITS}.")
    device = rows[0].device
    log_probs_out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    entropies_out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    aux_losses: list[float] = []
    for idx in partition or micro_batches([len(r) for r in rows], max_tokens):
        idx = list(idx)
        lengths = [len(rows[i]) for i in idx]
        width = max(lengths)
        ids = torch.zeros(len(idx), width, dtype=torch.long, device=device)
        for k, i in enumerate(idx):
            ids[k, : lengths[k]] = rows[i]
        kwargs: dict = {"use_cache": False}
        if min(lengths) < width:  # right padding: real tokens never attend to it
            mask = torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
            kwargs["attention_mask"] = mask.long()
        if logits == "response":
            kwargs["logits_to_keep"] = width - min(starts[i] for i in idx) + 1
        if router_aux_loss_coef is not None:
            kwargs["output_router_logits"] = True
        output = model(input_ids=ids, **kwargs)
        out = output.logits
        offset = width - out.shape[1]  # position of out[:, 0]
        # logit at position t predicts token t + 1: row i's response comes from starts[i] - 1 .. len - 2
        spans = [(starts[i], n) for i, n in zip(idx, lengths, strict=True)]
        counts = [n - start for start, n in spans]
        batch_idx = torch.repeat_interleave(torch.arange(len(idx), device=device), torch.tensor(counts, device=device))
        pos_idx = torch.cat([torch.arange(start - 1, n - 1, device=device) for start, n in spans])
        labels = torch.cat([rows[i][starts[i] :] for i in idx])
        lps, ents = token_log_probs(out[batch_idx, pos_idx - offset], labels, temperature, entropy)
        per_row = list(lps.split(counts))
        for k, i in enumerate(idx):
            log_probs_out[i] = per_row[k].detach()
        if ents is not None:
            for i, e in zip(idx, ents.split(counts), strict=True):
                entropies_out[i] = e.detach()
        if loss_fn is not None:
            loss = loss_fn(idx, per_row)
            if router_aux_loss_coef is not None:
                aux_losses.append(output.aux_loss.item())
                loss = loss + router_aux_loss_coef * output.aux_loss
            loss.backward()
        del out, output
    return log_probs_out, (entropies_out if entropy else None), aux_losses
