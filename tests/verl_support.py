"""Run verl 0.9.1's real FSDP engines on CPU for tests.

The CPU stand-ins (verl's CPU platform and the patches it needs) are project code:
`verl_prefix.backend.cpu`, re-exported here as `install_cpu_platform`. Everything else (FSDP2 over
gloo, verl's configs, engines, losses, TensorDict layout) is real.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import torch

from verl_prefix.backend.cpu import (  # noqa: F401  (re-exported for outside checks)
    install_cpu_platform,
    load_value_models_with_sdpa,
)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int = 0, world_size: int = 1, port: int | None = None) -> None:
    """gloo process group (idempotent for world size 1)."""
    if torch.distributed.is_initialized():
        return
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port or free_port())
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(rank), str(world_size)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


VOCAB = 128


def save_tiny_qwen3(
    path: str, seed: int = 0, value_model: bool = False, moe: bool = False, **config_overrides: Any
) -> str:
    """A tiny random Qwen3 (Qwen3-MoE with `moe`) and a word-level tokenizer, saved like a hub
    checkpoint; no download. `config_overrides` replace Qwen3Config fields (e.g. hidden_size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, PreTrainedTokenizerFast

    from verl_prefix.random_models import model_config

    vocab = {f"t{i}": i for i in range(VOCAB - 3)} | {"<pad>": VOCAB - 3, "<eos>": VOCAB - 2, "<unk>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
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
    fast.save_pretrained(path)
    return path


def build_worker(model_dir: str, reuse: bool, model_type: str = "language_model", **engine_kwargs):
    """verl's real TrainingWorker (FSDP2, fp32, SDPA) in this process.

    reuse=False builds verl's stock engine class (the lookup skips verl-prefix's vendor keys);
    reuse=True builds verl-prefix's engine with `prefix_reuse.enable=true`. `engine_kwargs` are
    FSDPEngineConfig fields, plus `prefix_reuse` (settings dict), `use_remove_padding` and
    `enable_gradient_checkpointing` (model config).
    """
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.config.engine import TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker

    from verl_prefix.backend.config import PrefixReuseSettings, attach
    from verl_prefix.backend.registry import install_engines

    install_engines()
    settings = dict(engine_kwargs.pop("prefix_reuse", {}))
    use_remove_padding = engine_kwargs.pop("use_remove_padding", True)
    checkpointing = engine_kwargs.pop("enable_gradient_checkpointing", False)
    model_config = HFModelConfig(
        path=model_dir,
        use_remove_padding=use_remove_padding,
        enable_gradient_checkpointing=checkpointing,
        override_config={"attn_implementation": "sdpa"},
    )
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    defaults = dict(strategy="fsdp2", use_torch_compile=False, mixed_precision=fp32, model_dtype="fp32")
    engine_config = FSDPEngineConfig(**{**defaults, **engine_kwargs})
    if reuse:
        attach(engine_config, PrefixReuseSettings(**{"enable": True, **settings}))
    os.environ["VERL_ENGINE_VENDOR"] = "nvidia" if reuse else "stock"
    try:
        worker = TrainingWorker(
            TrainingWorkerConfig(
                model_type=model_type,
                model_config=model_config,
                engine_config=engine_config,
                optimizer_config=FSDPOptimizerConfig(lr=1e-3),
                checkpoint_config=CheckpointConfig(),
            )
        )
    finally:
        os.environ["VERL_ENGINE_VENDOR"] = "nvidia"
    worker.reset()
    return worker


def nested(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(xs, layout=torch.jagged)


def rows_tensordict(prompts, responses, uids, response_fields: dict, **meta):
    """verl's V1 update/log-prob TensorDict: nested (jagged) rows, response-length fields, uid."""
    from verl.utils import tensordict_utils as tu

    ids = [torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)]
    mask = [torch.ones(len(r), dtype=torch.int64) for r in responses]
    fields = dict(
        input_ids=nested(ids),
        position_ids=nested([torch.arange(len(x)) for x in ids]),
        prompts=nested(list(prompts)),
        responses=nested(list(responses)),
        attention_mask=nested([torch.ones(len(x), dtype=torch.int64) for x in ids]),
        response_mask=nested(mask),
        loss_mask=nested([m.clone() for m in mask]),
        uid=list(uids),
        **{k: nested(list(v)) for k, v in response_fields.items()},
    )
    n = len(ids)
    defaults = dict(
        calculate_entropy=False,
        global_batch_size=n,
        mini_batch_size=n,
        epochs=1,
        seed=1,
        dataloader_kwargs={"shuffle": False},
        temperature=1.0,
    )
    return tu.get_tensordict(tensor_dict=fields, non_tensor_dict={**defaults, **meta})


def make_batch(groups, seed: int = 0, calculate_entropy: bool = False, temperature: float = 1.0, critic=False):
    """A random mini-batch. groups: list of (prompt_len, [response lengths]), one uid each."""
    gen = torch.Generator().manual_seed(seed)
    prompts, responses, uids = [], [], []
    for g, (prompt_len, resp_lens) in enumerate(groups):
        prompt = torch.randint(0, VOCAB - 3, (prompt_len,), generator=gen)
        for n in resp_lens:
            prompts.append(prompt)
            responses.append(torch.randint(0, VOCAB - 3, (n,), generator=gen))
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


def value_loss_fn():
    from functools import partial

    from verl.workers.config import FSDPCriticConfig
    from verl.workers.utils.losses import value_loss

    return partial(value_loss, config=FSDPCriticConfig(strategy="fsdp2", ppo_micro_batch_size_per_gpu=2, rollout_n=4))


def ppo_loss_fn():
    from functools import partial

    from verl.workers.config import FSDPActorConfig
    from verl.workers.utils.losses import ppo_loss

    config = FSDPActorConfig(strategy="fsdp2", rollout_n=4, ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=2)
    return partial(ppo_loss, config=config)


def two_rank_compare(rank: int, port: int, model_dir: str, out_dir: str, case: dict) -> None:
    """mp.spawn target (dp=2 over gloo): stock vs reuse on one mini-batch per rank.

    case: `groups_per_rank` {rank: [(prompt_len, [response lengths]), ...]} (make_batch groups),
    `engine` (build_worker kwargs) and `critic` (a value model at `model_dir`: value_loss, values). Runs a training
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
        data = make_batch(case["groups_per_rank"][rank], seed=rank, critic=critic)
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
    import torch.multiprocessing as mp

    ctx = mp.start_processes(target, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise AssertionError(f"two-rank run still going after {timeout:.0f} s: a hang")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
