"""The FLOP bound (docs/design.md): dense FLOPs / shared-prefix FLOPs for a batch.

Counts matmul FLOPs only (2 per multiply-add). Per token: the decoder's projections and MLP
(MoE: the routed experts a token visits plus the router), and the lm_head. Per attention pair
(query, visible key) and layer: QK^T and PV, 4 * heads * head_dim. Training = 3x forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FlopModel:
    """Forward FLOPs per token (decoder, lm_head) and per causal attention pair."""

    per_token: float
    per_token_lm_head: float
    per_pair: float

    @classmethod
    def from_config(cls, config) -> FlopModel:
        """Build from a transformers decoder config (Llama/Qwen2/Qwen3/Qwen3-MoE field names)."""
        cfg = getattr(config, "text_config", None) or config
        hidden = cfg.hidden_size
        layers = cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        attn_proj = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o, k, v
        experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
        if experts:
            top_k = cfg.num_experts_per_tok
            moe_inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
            mlp = 3 * hidden * moe_inter * top_k + hidden * experts
        else:
            mlp = 3 * hidden * cfg.intermediate_size  # gated MLP: gate, up, down
        return cls(
            per_token=2.0 * layers * (attn_proj + mlp),
            per_token_lm_head=2.0 * hidden * cfg.vocab_size,
            per_pair=4.0 * layers * heads * head_dim,
        )

    def dense_forward(self, lengths: Sequence[int], lm_head_tokens: int | None = None) -> float:
        """Forward FLOPs of dense causal rows; the lm_head runs over `lm_head_tokens` (None: every token)."""
        tokens = sum(lengths)
        pairs = sum(n * (n + 1) / 2 for n in lengths)
        head = tokens if lm_head_tokens is None else lm_head_tokens
        return tokens * self.per_token + head * self.per_token_lm_head + pairs * self.per_pair

    def prefix_forward(self, prefix_len: int, lm_head: bool = False, above: int = 0) -> float:
        """Forward FLOPs of one prefix (span) reading `above` stored tokens; the schedule skips its
        lm_head (its logits are never read)."""
        per_token = self.per_token + (self.per_token_lm_head if lm_head else 0.0)
        pairs = prefix_len * above + prefix_len * (prefix_len + 1) / 2
        return prefix_len * per_token + pairs * self.per_pair

    def suffix_forward(self, prefix_len: int, suffix_len: int) -> float:
        """Forward FLOPs of one suffix reading a prefix of `prefix_len` tokens."""
        pairs = suffix_len * prefix_len + suffix_len * (suffix_len + 1) / 2
        return suffix_len * (self.per_token + self.per_token_lm_head) + pairs * self.per_pair

    def tree_forward_ratio(
        self, spans: Sequence[tuple[int, int]], suffixes: Sequence[tuple[int, int]], readouts: int = 0
    ) -> float:
        """Dense/reuse forward-only FLOPs (log-probs) of the batch described as in
        `tree_training_ratio`: dense runs the lm_head at every position, as verl's engines do; reuse
        over suffix tokens and the spans' `readouts` positions."""
        dense = self.dense_forward([a + n for a, n in suffixes])
        reuse = self._spans_forward(spans) + self._suffixes_forward(suffixes) + readouts * self.per_token_lm_head
        return dense / reuse if reuse else 1.0

    def tree_training_ratio(
        self,
        spans: Sequence[tuple[int, int]],
        suffixes: Sequence[tuple[int, int]],
        recompute: bool = False,
        prefix_lm_head: bool = False,
        dense_lm_head_all: bool = True,
        readouts: int = 0,
        dense_lm_head_tokens: int | None = None,
    ) -> float:
        """Dense/reuse training FLOPs: `spans` and `suffixes` are (tokens read above, tokens computed)
        per shared span (each computed once) and per row's suffix; a row's dense length is its
        suffix's sum. One prefix per group: spans that read nothing above (`training_ratio`).

        `recompute` adds one more forward of every span (Phase C's). `readouts`: positions whose
        lm_head the spans compute (shared response tokens' logits). `prefix_lm_head=True` charges
        the spans an lm_head at every token (the conservative figures quoted in docs/design.md).
        `dense_lm_head_all=False` charges the dense side an lm_head over `dense_lm_head_tokens`
        positions only (default: the suffix tokens; a dense baseline computing just the logits it reads).
        """
        head = None
        if not dense_lm_head_all:
            head = sum(n for _, n in suffixes) if dense_lm_head_tokens is None else dense_lm_head_tokens
        dense = 3 * self.dense_forward([a + n for a, n in suffixes], head)
        spans_head = 0.0 if prefix_lm_head else readouts * self.per_token_lm_head
        reuse = 3 * (self._spans_forward(spans, prefix_lm_head) + spans_head + self._suffixes_forward(suffixes))
        if recompute:
            reuse += self._spans_forward(spans)
        return dense / reuse if reuse else 1.0

    def training_ratio(
        self,
        prefix_lens: Sequence[int],
        suffix_lens: Sequence[Sequence[int]],
        recompute: bool = False,
        prefix_lm_head: bool = False,
        dense_lm_head_all: bool = True,
    ) -> float:
        """`tree_training_ratio` of one prefix per group: group i has prefix prefix_lens[i] (0: rows
        that share nothing) and suffixes suffix_lens[i]."""
        spans = [(0, p) for p in prefix_lens if p > 0]
        suffixes = [(p, s) for p, ss in zip(prefix_lens, suffix_lens, strict=True) for s in ss]
        return self.tree_training_ratio(spans, suffixes, recompute, prefix_lm_head, dense_lm_head_all)

    def _spans_forward(self, spans: Sequence[tuple[int, int]], lm_head: bool = False) -> float:
        return sum(self.prefix_forward(n, lm_head, above=a) for a, n in spans)

    def _suffixes_forward(self, suffixes: Sequence[tuple[int, int]]) -> float:
        return sum(self.suffix_forward(a, n) for a, n in suffixes)
