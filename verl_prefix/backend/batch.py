"""Reading verl's mini-batch TensorDict as the core schedule's rows (no model work here)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu


@dataclass
class ScheduleRows:
    """One mini-batch as the core sees it. Row i = prompt + response of sample i, unpadded."""

    input_ids: list[torch.Tensor]
    response_start: list[int]
    group_ids: list[Hashable]
    row_temperature: list[float] | None


def prompt_lengths(data: TensorDict) -> torch.Tensor:
    """Real prompt length per sample: nested `prompts`, or the prompt part of `attention_mask`."""
    prompts = data["prompts"]
    if prompts.is_nested:
        return prompts.offsets().diff()
    return data["attention_mask"][:, : prompts.shape[1]].sum(dim=1)


MIN_TEMPERATURE = 1e-8  # verl's FSDP engine's floor on the logits' temperature


def schedule_rows(data: TensorDict) -> ScheduleRows:
    """Rows, response starts, uids and per-sample temperatures of a NO_PADDING mini-batch."""
    input_ids = data["input_ids"]
    if not input_ids.is_nested:
        raise ValueError("prefix reuse reads verl's NO_PADDING (nested) input_ids; pad_mode must be no_padding.")
    rows = list(input_ids.unbind())
    starts = [int(n) for n in prompt_lengths(data)]
    uids = tu.get(data, "uid", default=None)
    if uids is None:
        uids = list(range(len(rows)))  # no uid: nothing is shared, every row runs dense
    temperature = data.get("temperature", 1.0) if "temperature" in data.keys() else 1.0
    temperature = tu.get_non_tensor_data(data=data, key="temperature", default=temperature)
    if isinstance(temperature, torch.Tensor):
        row_temperature = [float(t) for t in temperature.reshape(-1)]
    else:
        row_temperature = [float(temperature)] * len(rows)
    # greedy rollouts (rollout.temperature=0) reach the engine as temperature 0: verl's engine divides
    # the logits by temperature.clamp(min=1e-8), so the schedule does the same
    row_temperature = [max(t, MIN_TEMPERATURE) for t in row_temperature]
    return ScheduleRows(rows, starts, list(uids), row_temperature)


def full_length_nested(values: list[torch.Tensor], rows: list[torch.Tensor], starts: list[int]) -> torch.Tensor:
    """Per-position tensors laid out like verl's model output: length len(row), position t holds the
    value for token t + 1; response positions [start - 1, len - 1) are filled, the rest are zero."""
    full = []
    for v, row, start in zip(values, rows, starts, strict=True):
        out = v.new_zeros(len(row))
        out = torch.cat([out[: start - 1], v, out[len(row) - 1 :]])
        full.append(out)
    return torch.nested.as_nested_tensor(full, layout=torch.jagged)
