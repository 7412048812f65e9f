"""A few GRPO steps on CPU with reuse on and off: same losses, same final parameters.

Rollouts: HF `generate` (sampling, seeded per step) on a copy of the policy synced from the
engine after every step. Reward: a rule on the response tokens. Advantages: verl's own GRPO
estimator. Old log-probs: the worker's infer_batch. Update: the worker's train_mini_batch.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import verl_support as vs

vs.install_cpu_platform()
vs.init_process_group()

from transformers import AutoModelForCausalLM  # noqa: E402
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

STEPS, GROUP, RESPONSE_LEN = 3, 4, 6
PROMPT_LENS = (24, 17)
TARGET = 7  # reward: fraction of response tokens below TARGET


def reward(response: torch.Tensor) -> float:
    return float((response < TARGET).float().mean())


def run(model_dir: str, reuse: bool) -> tuple[list[float], dict[str, torch.Tensor], list, list]:
    # reuse: every update also computes the stock engine's gradient of the same mini-batch from the
    # same parameters (verify_every=1) and reports the largest relative difference
    worker = vs.build_worker(
        model_dir,
        reuse=reuse,
        use_dynamic_bsz=True,
        max_token_len_per_gpu=64,
        infer_max_token_len_per_gpu=64,
        prefix_reuse={"verify_every": 1},
    )
    config = FSDPActorConfig(strategy="fsdp2", rollout_n=GROUP, ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=2)
    worker.set_loss_fn(partial(ppo_loss, config=config))
    policy = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vs.VOCAB - 3, (n,), generator=gen) for n in PROMPT_LENS]
    losses, groups, verify = [], [], []
    for step in range(STEPS):
        state = {n: p.full_tensor().detach() for n, p in worker.engine.module.named_parameters()}
        policy.load_state_dict(state)
        rows_prompts, responses, uids = [], [], []
        for g, prompt in enumerate(prompts):
            torch.manual_seed(1000 * step + g)
            out = policy.generate(
                prompt[None].repeat(GROUP, 1),
                do_sample=True,
                max_new_tokens=RESPONSE_LEN,
                min_new_tokens=RESPONSE_LEN,
                pad_token_id=vs.VOCAB - 3,
                top_k=0,
            )
            for row in out:
                rows_prompts.append(prompt)
                responses.append(row[len(prompt) :])
                uids.append(f"step{step}-prompt{g}")
        zeros = [torch.zeros(len(r)) for r in responses]
        data = vs.rows_tensordict(rows_prompts, responses, uids, {}, calculate_entropy=True, compute_loss=False)
        old = tu.get(worker.infer_batch(data), "log_probs")
        old_log_probs = [old[i][len(p) - 1 : -1] for i, p in enumerate(rows_prompts)]
        scores = torch.tensor([reward(r) for r in responses])
        token_rewards = torch.stack(zeros)
        token_rewards[:, -1] = scores
        advantages, _ = compute_grpo_outcome_advantage(
            token_level_rewards=token_rewards, response_mask=torch.ones_like(token_rewards), index=np.array(uids)
        )
        data = vs.rows_tensordict(
            rows_prompts, responses, uids, {"old_log_probs": old_log_probs, "advantages": list(advantages)}
        )
        metrics = tu.get(worker.train_mini_batch(data), "metrics")
        losses.append(float(np.mean(metrics["actor/pg_loss"])))
        groups.append(metrics.get("prefix_reuse/groups"))
        verify.append(metrics.get("prefix_reuse/verify_max_grad_rel_diff"))
    final = {n: p.full_tensor().detach().clone() for n, p in worker.engine.module.named_parameters()}
    return losses, final, groups, verify


def test_grpo_loop_reuse_matches_dense(tmp_path):
    model_dir = vs.save_tiny_qwen3(str(tmp_path))
    dense_losses, dense_params, dense_groups, _ = run(model_dir, reuse=False)
    reuse_losses, reuse_params, reuse_groups, verify = run(model_dir, reuse=True)
    assert dense_groups == [None] * STEPS
    assert reuse_groups == [[2.0]] * STEPS  # both prompts' prefixes ran once per update
    assert len(set(dense_losses)) > 1  # the policy moved and the rollouts changed
    np.testing.assert_allclose(reuse_losses, dense_losses, rtol=1e-4, atol=1e-6)
    # every step: the gradient before the optimizer step equals the stock engine's on the same
    # parameters and mini-batch (fp32)
    assert len(verify) == STEPS and all(v is not None and v[0] <= 2e-5 for v in verify), verify
    for name, p in dense_params.items():
        # the two runs' parameters drift apart only where AdamW amplifies fp32 rounding
        # (near-zero gradient entries), so on average they stay together
        assert (reuse_params[name] - p).abs().mean() <= 1e-6, name
