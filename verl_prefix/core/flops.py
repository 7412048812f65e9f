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

    def forward_ratio(self, prefix_lens: Sequence[int], suffix_lens: Sequence[Sequence[int]]) -> float:
        """Dense/reuse forward-only FLOPs (log-probs): dense runs the lm_head at every position,
        as verl's engines do; reuse over suffix tokens only."""
        dense = sum(self.dense_forward([p + s for s in ss]) for p, ss in zip(prefix_lens, suffix_lens, strict=True))
        reuse = sum(
            self.prefix_forward(p) + sum(self.suffix_forward(p, s) for s in ss)
            for p, ss in zip(prefix_lens, suffix_lens, strict=True)
        )
        return dense / reuse if reuse else 1.0

    def tree_forward_ratio(self, spans: Sequence[tuple[int, int]], suffixes: Sequence[tuple[int, int]]) -> float:
        """Dense/reuse forward-only FLOPs of a prefix tree (as `tree_training_ratio`; dense runs the
        lm_head at every position, as verl's engines do)."""
        dense = self.dense_forward([a + n for a, n in suffixes])
        reuse = sum(self.prefix_forward(n, above=a) for a, n in spans) + sum(
            self.suffix_forward(a, n) for a, n in suffixes
        )
        return dense / reuse if reuse else 1.0

    def tree_training_ratio(
        self,
        spans: Sequence[tuple[int, int]],
        suffixes: Sequence[tuple[int, int]],
        recompute: bool = False,
        dense_lm_head_all: bool = True,
    ) -> float:
        """Dense/reuse training FLOPs of a prefix tree: `spans` and `suffixes` are (tokens read above,
        tokens computed) per shared span and per row's suffix; a row's dense length is their sum.
        With one level (spans read nothing above) it equals `training_ratio`."""
        head = None if dense_lm_head_all else sum(n for _, n in suffixes)
        dense = 3 * self.dense_forward([a + n for a, n in suffixes], head)
        prefixes = sum(self.prefix_forward(n, above=a) for a, n in spans)
        reuse = 3 * (prefixes + sum(self.suffix_forward(a, n) for a, n in suffixes))
        if recompute:
            reuse += prefixes
        return dense / reuse if reuse else 1.0

    def training_ratio(
        self,
        prefix_lens: Sequence[int],
        suffix_lens: Sequence[Sequence[int]],
        recompute: bool = False,
        prefix_lm_head: bool = False,
        dense_lm_head_all: bool = True,
    ) -> float:
        """Dense/reuse training FLOPs; group i has prefix prefix_lens[i] and suffixes suffix_lens[i].

        `prefix_lm_head=True` charges the reuse side an lm_head over prefix tokens too (the
        conservative figures quoted in docs/design.md); the schedule itself skips it.
        `dense_lm_head_all=False` charges the dense side an lm_head over the suffix positions only
        (a dense baseline that computes just the logits it reads).
        """
        dense = reuse = 0.0
        for p, suffixes in zip(prefix_lens, suffix_lens, strict=True):
            head = None if dense_lm_head_all else sum(suffixes)
            dense += 3 * self.dense_forward([p + s for s in suffixes], head)
            reuse += 3 * (self.prefix_forward(p, prefix_lm_head) + sum(self.suffix_forward(p, s) for s in suffixes))
            if recompute:
                reuse += self.prefix_forward(p)
        return dense / reuse if reuse else 1.0
