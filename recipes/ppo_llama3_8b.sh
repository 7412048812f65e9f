#!/usr/bin/env bash
# PPO (GAE critic) on Llama-3-8B-Instruct with vLLM rollout; reuse for actor, reference and critic.
#   REUSE=true  bash recipes/ppo_llama3_8b.sh
#   REUSE=false bash recipes/ppo_llama3_8b.sh
set -euo pipefail

REUSE=${REUSE:-true}
MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct}
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/gsm8k/train.parquet}
VAL_FILE=${VAL_FILE:-$HOME/data/gsm8k/test.parquet}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
LOGGERS=${LOGGERS:-'["console","wandb"]'}

python3 -m verl_prefix.main_ppo \
    algorithm.adv_estimator=gae \
    data.train_files="$TRAIN_FILE" \
    data.val_files="$VAL_FILE" \
    data.train_batch_size=256 \
    data.max_prompt_length=8192 \
    data.max_response_length=1024 \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=true \
    actor_rollout_ref.model.enable_gradient_checkpointing=true \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.use_dynamic_bsz=true \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24576 \
    actor_rollout_ref.actor.prefix_reuse.enable="$REUSE" \
    actor_rollout_ref.actor.prefix_reuse.attention=flex \
    actor_rollout_ref.ref.strategy=fsdp2 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=4 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true \
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=32768 \
    critic.strategy=fsdp2 \
    critic.model.path="$MODEL" \
    critic.model.use_remove_padding=true \
    critic.optim.lr=1e-5 \
    critic.use_dynamic_bsz=true \
    critic.ppo_max_token_len_per_gpu=32768 \
    critic.prefix_reuse.enable="$REUSE" \
    critic.prefix_reuse.attention=flex \
    trainer.logger="$LOGGERS" \
    trainer.project_name=verl-prefix \
    trainer.experiment_name="ppo-llama3-8b-reuse-$REUSE" \
    trainer.nnodes="$NNODES" \
    trainer.n_gpus_per_node="$GPUS_PER_NODE" \
    trainer.save_freq=50 \
    trainer.test_freq=25 \
    "$@"
