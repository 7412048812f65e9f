"""Exact three-phase shared-prefix schedule for Hugging Face causal LMs (pure torch + transformers)."""

from .config import PrefixReuseConfig, ScheduleStats
from .flops import FlopModel
from .runtime import ScheduleRuntime
from .schedule import compute_log_probs, compute_values, forward_backward, token_log_probs

__all__ = [
    "FlopModel",
    "PrefixReuseConfig",
    "ScheduleRuntime",
    "ScheduleStats",
    "compute_log_probs",
    "compute_values",
    "forward_backward",
    "token_log_probs",
]
