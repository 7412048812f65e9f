"""Configuration and per-call statistics of the shared-prefix schedule."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

AttentionBackend = Literal["auto", "merged", "sdpa", "flex", "flash_attn"]
PrefixActivations = Literal["keep", "offload", "recompute"]

ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "merged", "sdpa", "flex", "flash_attn")
PREFIX_ACTIVATION_MODES: tuple[str, ...] = ("keep", "offload", "recompute")


@dataclass
class PrefixReuseConfig:
    """How the three-phase schedule packs, attends and stores.

    Attributes:
        max_tokens_per_micro_batch: token budget of one suffix micro-batch (sum of suffix lengths) and
            of one Phase-A prefix chunk. A single suffix longer than the budget is an error; a single
            prefix longer than it runs alone in its chunk (a prefix is never split). None = no limit.
        attention: "auto" (the fastest exact backend of the device: "merged" on CPU, "sdpa"
            elsewhere), "merged" (per block one prefix call and per-row causal calls merged by
            log-sum-exp, kernel-only backward; CPU), "sdpa" (masked reference, any device), "flex"
            (FlexAttention over packed [prefixes ; suffixes], prefix K/V never duplicated;
            forward-only on CPU), or "flash_attn" (varlen kernel, CUDA + flash-attn installed).
        prefix_activations: what happens to the dormant prefix graph during Phase B: "keep" it,
            "offload" its saved tensors to CPU, or "recompute" the prefix forward in Phase C.
        min_prefix_tokens: groups whose shared prefix is shorter than this run dense (in a tree: a
            shared span shorter than this gets no node; its rows compute it themselves).
        prefix_tree: share every span that several rows hold, found from the tokens across group
            ids: a system prompt common to all groups, then each group's question, then response
            tokens several rows share (multi-turn trajectories, tree rollouts), whose outputs are
            computed once and read by every row holding them. A prefix tree, run top-down in Phase A
            and bottom-up in Phase C. False = one prefix per group id, prompt tokens only.
        min_node_saving: in a tree, a nested node (one with a parent or a child) must save at least
            this many token computations (its tokens x (its readers - 1), readers: the child nodes
            and rows that read it directly); each tree level costs one more Phase-A and Phase-C
            pass over the model, so smaller spans are computed by the nodes or rows below them. A
            group's one prefix is never dropped by this rule.
        temperature: logits are divided by it before log-softmax, as verl does.
        router_aux_loss: MoE only. Add, per suffix micro-batch, coef x transformers'
            `load_balancing_loss_func` of the dense micro-batch made of the same rows (prefix tokens
            counted once per row: logical prefix-token accounting). Training only.
        router_aux_loss_coef: the coefficient; None = the model config's `router_aux_loss_coef`.
    """

    max_tokens_per_micro_batch: int | None = 4096
    attention: AttentionBackend = "auto"
    prefix_activations: PrefixActivations = "keep"
    min_prefix_tokens: int = 1
    prefix_tree: bool = True
    min_node_saving: int = 256
    temperature: float = 1.0
    router_aux_loss: bool = False
    router_aux_loss_coef: float | None = None

    def validate(self, owner: str = "PrefixReuseConfig") -> None:
        """Raise ValueError naming the field (as `owner.field`) and the fix for any unsupported value.

        The one place these fields are checked: verl's `prefix_reuse` blocks validate through it too.
        """
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"{owner}.attention={self.attention!r} is unknown; use one of {ATTENTION_BACKENDS}.")
        if self.prefix_activations not in PREFIX_ACTIVATION_MODES:
            raise ValueError(
                f"{owner}.prefix_activations={self.prefix_activations!r} is unknown; "
                f"use one of {PREFIX_ACTIVATION_MODES}."
            )
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError(
                f"{owner}.max_tokens_per_micro_batch={self.max_tokens_per_micro_batch} must be "
                ">= 1 (or None for no limit)."
            )
        if self.min_prefix_tokens < 1:
            raise ValueError(f"{owner}.min_prefix_tokens={self.min_prefix_tokens} must be >= 1.")
        if self.min_node_saving < 0:
            raise ValueError(f"{owner}.min_node_saving={self.min_node_saving} must be >= 0.")
        if not self.temperature > 0:
            raise ValueError(f"{owner}.temperature={self.temperature} must be > 0.")
        if self.router_aux_loss_coef is not None and not self.router_aux_loss_coef >= 0:
            raise ValueError(f"{owner}.router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0 (or None).")


@dataclass
class ScheduleStats:
    """What one schedule call did and cost.

    Token counts are exact; `flop_bound` is the dense/reuse FLOP ratio of this batch (docs/design.md, "FLOP bound":
    token-linear work, causal attention pairs and the lm_head, training = 3x forward, plus one prefix
    forward when prefix activations are recomputed). Seconds are wall time per phase. Peak memory is
    in bytes per phase: CUDA `max_memory_allocated` (reset at each phase start) on GPU, the process's
    peak resident set (reset through /proc/self/clear_refs) on CPU, None where neither is available.
    """

    rows: int = 0
    groups: int = 0  # shared spans (groups or tree nodes) that run Phase A/C; a node chained over passes counts once
    dense_rows: int = 0  # rows that share nothing and run as plain dense sequences
    micro_batches: int = 0
    prefix_chunks: int = 0  # Phase-A (and Phase-C) passes
    # one-token passes run to match another data-parallel rank's pass count (ScheduleRuntime.group)
    padding_passes: int = 0
    prefix_tokens: int = 0  # prefix tokens computed (once per group)
    suffix_tokens: int = 0  # tokens run in Phase B
    dense_tokens: int = 0  # tokens a dense pass computes (sum of row lengths)
    flop_bound: float = 1.0
    seconds: dict[str, float] = field(default_factory=lambda: {"A": 0.0, "B": 0.0, "C": 0.0})
    peak_memory_bytes: dict[str, int | None] = field(default_factory=lambda: {"A": None, "B": None, "C": None})
    # router load-balancing aux loss (unscaled by coef): sum over micro-batches, and per micro-batch
    # in micro-batch order; None when PrefixReuseConfig.router_aux_loss is off
    router_aux_loss: float | None = None
    router_aux_losses: list[float] | None = None

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def as_dict(self) -> dict:
        return asdict(self)
