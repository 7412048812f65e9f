"""Run verl 0.9.1's real FSDP engines on CPU for tests.

The CPU stand-ins (verl's CPU platform and the patches it needs) are project code:
`verl_prefix.backend.cpu`, re-exported here as `install_cpu_platform`. Everything else (FSDP2 over
gloo, verl's configs, engines, losses, TensorDict layout) is real.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from verl_prefix.backend.cpu import (  # noqa: F401  (re-exported for outside checks)
    install_cpu_platform,
    load_value_models_with_sdpa,
)
from verl_prefix.backend.harness import (  # noqa: F401  (re-exported for outside checks)
    build_worker,
    free_port,
    init_process_group,
    nested,
    ppo_loss_fn,
    rows_tensordict,
    save_word_tokenizer,
    value_loss_fn,
)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

VOCAB = 128


def save_tiny_qwen3(
    path: str, seed: int = 0, value_model: bool = False, moe: bool = False, **config_overrides: Any
) -> str:
    """A tiny random Qwen3 (Qwen3-MoE with `moe`) and a word-level tokenizer, saved like a hub
    checkpoint; no download. `config_overrides` replace Qwen3Config fields (e.g. hidden_size)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    from verl_prefix.random_models import model_config

    dims = dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        vocab_size=VOCAB,
        max_positions=512,
    )
    fields = dict(pad_token_id=VOCAB - 3, eos_token_id=VOCAB - 2, bos_token_id=VOCAB - 2)
    if moe:
        fields.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    for key, value in config_overrides.items():
        (dims if key in dims else fields)[key] = value
    config = model_config("qwen3_moe" if moe else "qwen3", **dims, **fields)
    torch.manual_seed(seed)
    if value_model:
        config.num_labels = 1
        model = AutoModelForTokenClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    save_word_tokenizer(path, VOCAB)
    return path


def make_batch(
    groups,
    seed: int = 0,
    calculate_entropy: bool = False,
    temperature: float = 1.0,
    critic=False,
    system_len: int = 0,
    response_stem: int = 0,
):
    """A random mini-batch. groups: list of (prompt_len, [response lengths]), one uid each; with
    `system_len`, every prompt opens with the same system prompt of that many tokens first; with
    `response_stem`, a group's responses open with the same that many tokens (a tree rollout)."""
    gen = torch.Generator().manual_seed(seed)
    system = torch.randint(0, VOCAB - 3, (system_len,), generator=gen) if system_len else None
    prompts, responses, uids = [], [], []
    for g, (prompt_len, resp_lens) in enumerate(groups):
        prompt = torch.randint(0, VOCAB - 3, (prompt_len,), generator=gen)
        if system is not None:
            prompt = torch.cat([system, prompt])
        stem = torch.randint(0, VOCAB - 3, (response_stem,), generator=gen)
        for n in resp_lens:
            prompts.append(prompt)
            response = torch.randint(0, VOCAB - 3, (n,), generator=gen)
            response[:response_stem] = stem[:n]
            responses.append(response)
            uids.append(f"uid-{g}")
    if critic:
        extra = dict(
            values=[torch.randn(len(r), generator=gen) * 0.1 for r in responses],
            returns=[torch.randn(len(r), generator=gen) for r in responses],
        )
    else:
        extra = dict(
            old_log_probs=[-torch.rand(len(r), generator=gen) - 4.5 for r in responses],
            advantages=[torch.randn(len(r), generator=gen) for r in responses],
        )
    return rows_tensordict(
        prompts, responses, uids, extra, calculate_entropy=calculate_entropy, temperature=temperature
    )


def two_rank_grads(rank: int, port: int, model_dir: str, out_dir: str, groups_per_rank) -> None:
    """mp.spawn target: stock vs reuse gradients of one dp=2 mini-batch; rank 0 writes the result."""
    two_rank_compare(rank, port, model_dir, out_dir, {"groups_per_rank": groups_per_rank})


def two_rank_compare(rank: int, port: int, model_dir: str, out_dir: str, case: dict) -> None:
    """mp.spawn target (dp=2 over gloo): stock vs reuse on one mini-batch per rank.

    case: `groups_per_rank` {rank: [(prompt_len, [response lengths]), ...]} (make_batch groups),
    `batch_per_rank` {rank: more make_batch kwargs, e.g. system_len, response_stem}, `engine`
    (build_worker kwargs) and `critic` (a value model at `model_dir`: value_loss, values). Runs a training
    forward_backward_batch (gradients before the optimizer step) and an infer_batch (log-probs or
    values) on both engines; rank 0 writes result.json with the largest relative gradient
    difference, the largest absolute per-token output difference and the reuse metrics of both ranks.
    """
    import json

    from verl.utils import tensordict_utils as tu

    install_cpu_platform()
    init_process_group(rank, 2, port)
    engine = dict(use_dynamic_bsz=True, max_token_len_per_gpu=48, infer_max_token_len_per_gpu=48)
    engine.update(case.get("engine", {}))
    budget = engine["max_token_len_per_gpu"]
    critic = case.get("critic", False)
    if critic:
        load_value_models_with_sdpa()
        engine["model_type"] = "value_model"
    loss_fn, output_key = (value_loss_fn(), "values") if critic else (ppo_loss_fn(), "log_probs")

    def batch():
        extra = case.get("batch_per_rank", {}).get(rank, {})
        data = make_batch(case["groups_per_rank"][rank], seed=rank, critic=critic, **extra)
        flags = dict(use_remove_padding=True, use_dynamic_bsz=True, max_token_len_per_gpu=budget)
        tu.assign_non_tensor(data, **flags, use_fused_kernels=False)
        return data

    result = {}
    for reuse in (False, True):
        worker = build_worker(model_dir, reuse=reuse, **engine)
        with worker.engine.train_mode():
            worker.engine.optimizer_zero_grad()
            out = worker.engine.forward_backward_batch(batch(), loss_fn, forward_only=False)
            grads = {n: p.grad.full_tensor() for n, p in worker.engine.module.named_parameters()}
        data = batch()
        tu.assign_non_tensor(data, compute_loss=False)
        log_probs = tu.get(worker.infer_batch(data), output_key)
        n_resp = data["responses"].offsets().diff().tolist()
        # full-length rows; the response part is what verl reads (position t holds token t + 1)
        rows = zip(log_probs.unbind(), n_resp, strict=True)
        response_lps = [lp[len(lp) - n - 1 : len(lp) - 1].clone() for lp, n in rows]
        metrics = {k: v for k, v in out["metrics"].items() if k.startswith("prefix_reuse/")}
        result[reuse] = (grads, response_lps, metrics)
    (stock, stock_lp, _), (reuse, reuse_lp, metrics) = result[False], result[True]
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, metrics)
    lp_err = max(float((a - b).abs().max()) if len(a) else 0.0 for a, b in zip(reuse_lp, stock_lp, strict=True))
    lp_errs = [None, None]
    torch.distributed.all_gather_object(lp_errs, lp_err)
    if rank == 0:
        errs = {n: ((reuse[n] - g).abs().max() / g.abs().max()).item() for n, g in stock.items()}
        with open(f"{out_dir}/result.json", "w") as f:
            json.dump(
                {
                    "max_rel_err": max(errs.values()),
                    "groups_rank0": gathered[0].get("prefix_reuse/groups"),
                    "metrics": gathered,
                    "max_log_prob_diff": max(lp_errs),
                },
                f,
            )
    torch.distributed.destroy_process_group()


def spawn_two_ranks(target, args: tuple, timeout: float = 300.0) -> None:
    """Run `target(rank, *args)` on two processes; a hang past `timeout` seconds or a failed rank
    fails the caller (AssertionError), and the processes are killed."""
    spawn_ranks(target, args, 2, timeout)


def spawn_ranks(target, args: tuple, nprocs: int, timeout: float = 300.0) -> None:
    """Run `target(rank, *args)` on `nprocs` processes; a hang past `timeout` seconds or a failed
    rank fails the caller (AssertionError), and the processes are killed."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(target, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise AssertionError(f"{nprocs}-rank run still going after {timeout:.0f} s: a hang")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
