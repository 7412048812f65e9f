"""verl-prefix: shared-prefix reuse for GRPO/PPO training with verl."""

__version__ = "0.1.0"
