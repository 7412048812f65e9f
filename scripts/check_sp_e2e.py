"""verl's real trainer loop with Ulysses sequence parallelism against the same loop at sp=1, on CPU.

Runs `verl_prefix.main_ppo` twice with the demo's model, data and overrides (reuse on, PPO with a
critic, vLLM's fp32 greedy rollout so both runs train on the same responses): once on one rank
(sp=1, the in-loop dense check on), once on two ranks with actor, reference and critic at
`ulysses_sequence_parallel_size=2`. The critic starts from a saved value head (a head initialised
at load time would differ between the runs). Every logged training figure of every step must agree
(rel 3e-4, abs 1e-5: the rows' order inside a step follows vLLM's completion order). Needs the demo
environment (`scripts/install-cpu-demo.sh`) and about 12 GB of memory; takes ~8 minutes.

    .venv-demo/bin/python scripts/check_sp_e2e.py [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from verl_prefix.demo import (
    DemoConfig,
    run_env,
    run_overrides,
    save_model,
    step_records,
    training_figures,
    write_dataset,
)

COMMON = [
    "algorithm.adv_estimator=gae",
    "actor_rollout_ref.rollout.top_k=1",
    "actor_rollout_ref.rollout.dtype=float32",
    "actor_rollout_ref.actor.optim.lr=1e-3",
    "critic.optim.lr=1e-3",
]
RUNS = {
    "sp1": ["actor_rollout_ref.actor.prefix_reuse.verify_every=1", "critic.prefix_reuse.verify_every=1"],
    "sp2": [
        "trainer.n_gpus_per_node=2",
        "ray_kwargs.ray_init.num_gpus=2",
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
        "actor_rollout_ref.ref.ulysses_sequence_parallel_size=2",
        "critic.fsdp.ulysses_sequence_parallel_size=2",
        # verl's own dense path is wrong under Ulysses without flash-attn: no in-loop check here
        "actor_rollout_ref.actor.prefix_reuse.verify_every=0",
        "critic.prefix_reuse.verify_every=0",
    ],
}


def save_value_model(model_dir: Path, path: Path) -> None:
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the load report lists the new head; it is meant
    torch.manual_seed(0)
    AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32).save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)


def run(out: Path, name: str, steps: int) -> dict[int, dict]:
    cfg = DemoConfig(out=str(out), steps=steps, overrides=[*COMMON, f"critic.model.path={out / 'critic'}", *RUNS[name]])
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "verl_prefix.main_ppo", *run_overrides(cfg, out, reuse=True)]
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=run_env(cfg, run_dir), cwd=run_dir)
    if proc.returncode:
        sys.exit(f"{name}: main_ppo failed (exit {proc.returncode}); see {run_dir / 'train.log'}")
    return step_records(run_dir / "metrics.jsonl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sp-e2e")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    save_model(out / "model", seed=0)
    write_dataset(out / "data", rows=DemoConfig().prompts_per_step * args.steps * 2, seed=0)
    save_value_model(out / "model", out / "critic")
    sp1, sp2 = run(out, "sp1", args.steps), run(out, "sp2", args.steps)
    failures, compared = [], 0
    for step, reference in sp1.items():
        for key, value in training_figures(reference).items():
            compared += 1
            got = sp2[step].get(key)
            if got is None or abs(got - value) > max(1e-5, 3e-4 * abs(value)):  # pytest.approx's rule
                failures.append(f"step {step} {key}: sp1 {value} sp2 {got}")
    for role in ("actor", "critic"):
        rows = [sp2[s][f"{role}/prefix_reuse/rows"] for s in sp2]
        fallbacks = [sp2[s][f"{role}/prefix_reuse/fallbacks"] for s in sp2]
        print(f"{role}: sp=2 rows per step {rows}, fallbacks {fallbacks}")
    verify = [sp1[s].get("actor/prefix_reuse/verify_max_grad_rel_diff") for s in sp1]
    print(f"sp=1 in-loop dense check (actor, per step): {verify}")
    print(f"{compared} figures compared, {len(failures)} past rel 3e-4 / abs 1e-5")
    print("\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
