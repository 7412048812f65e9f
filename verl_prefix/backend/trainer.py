"""Trainer = when. verl's V1 synchronous PPO trainer with the reuse workers and group-aware balancing.

Select it with `trainer.v1.trainer_mode=prefix_reuse` (the configs in verl_prefix/configs do).
"""

from __future__ import annotations

import ray
import torch
from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.seqlen_balancing import log_seqlen_unbalance

from .balance import group_balanced_order, uid_of_key
from .workers import PrefixReuseActorRolloutRefWorker, PrefixReuseTrainingWorker

TRAINER_NAME = "prefix_reuse"


@register_trainer(TRAINER_NAME)
class PrefixReusePPOTrainer(PPOTrainerSync):
    """PPOTrainerSync whose workers reuse shared prefixes and whose dp balancing keeps uid groups whole."""

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        for role in list(self.role_worker_mapping):
            worker = PrefixReuseTrainingWorker if role == Role.Critic else PrefixReuseActorRolloutRefWorker
            self.role_worker_mapping[role] = ray.remote(worker)

    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        """As verl's `_balance_batch`, but the partition unit is the uid group, not the sample."""
        role, worker_group = "actor", self.actor_rollout_wg
        if role not in worker_group._dispatch_info:
            worker_group._dispatch_info[role] = worker_group._query_dispatch_info(role)
        dp_size = max(worker_group._dispatch_info[role]) + 1

        batch = upsample_batch_to_divisible_size(
            batch, self._get_required_batch_multiple(dp_size), self.tokenizer.eos_token_id
        )
        seq_lens = [int(tag["seq_len"]) for tag in batch.tags]
        order = group_balanced_order([uid_of_key(k) for k in batch.keys], seq_lens, dp_size)
        batch.reorder(order)
        per_rank = len(order) // dp_size
        partitions = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(dp_size)]
        metrics.update(
            log_seqlen_unbalance(
                seqlen_list=torch.tensor(seq_lens)[order].tolist(), partitions=partitions, prefix=logging_prefix
            )
        )
        return batch
