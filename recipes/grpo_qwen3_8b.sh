#!/usr/bin/env bash
# GRPO on Qwen3-8B with vLLM rollout, shared-prefix reuse on or off (REUSE=true|false).
# Compare the two runs in your tracker: same data, same seed, different experiment_name.
#   REUSE=true  bash recipes/grpo_qwen3_8b.sh
#   REUSE=false bash recipes/grpo_qwen3_8b.sh
# Extra verl overrides can be appended: bash recipes/grpo_qwen3_8b.sh trainer.total_epochs=1
set -euo pipefail

REUSE=${REUSE:-true}
MODEL=${MODEL:-Qwen/Qwen3-8B}
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/gsm8k/train.parquet}
VAL_FILE=${VAL_FILE:-$HOME/data/gsm8k/test.parquet}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
LOGGERS=${LOGGERS:-'["console","wandb"]'}

python3 -m verl_prefix.main_ppo \
    algorithm.adv_estimator=grpo \
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
    actor_rollout_ref.actor.use_kl_loss=true \
    actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.actor.prefix_reuse.enable="$REUSE" \
    actor_rollout_ref.actor.prefix_reuse.attention=flex \
    actor_rollout_ref.actor.prefix_reuse.prefix_activations=offload \
    actor_rollout_ref.actor.prefix_reuse.verify_every=50 \
    actor_rollout_ref.ref.strategy=fsdp2 \
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=true \
    actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=32768 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true \
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=32768 \
    trainer.logger="$LOGGERS" \
    trainer.project_name=verl-prefix \
    trainer.experiment_name="grpo-qwen3-8b-reuse-$REUSE" \
    trainer.nnodes="$NNODES" \
    trainer.n_gpus_per_node="$GPUS_PER_NODE" \
    trainer.save_freq=50 \
    trainer.test_freq=25 \
    "$@"
