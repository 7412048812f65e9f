"""The bench's real peer: verl's stock FSDP engine against verl-prefix's engine on one mini-batch.

Both are verl 0.9.1's own `TrainingWorker` (FSDP2 in a one-rank process group, remove-padding,
dynamic batch size with the bench's token budget, verl's PPO loss) built from the same saved
model; only the engine class differs. Each timed call is one `forward_backward_batch` (training:
forward and backward, no optimizer step; forward-only: the log-prob pass), alternating stock and
reuse. On CPU verl runs on the project's CPU platform (`verl_prefix.backend.cpu`).
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .bench import BenchConfig

MIXED_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class EngineBenchResult:
    stock_seconds: float  # median over repeats
    reuse_seconds: float
    speedup: float
    flop_bound: float  # verl's engines run the lm_head at every position
    efficiency: float
    max_rel_diff: float  # gradients (training) or log-probs (forward-only), reuse vs stock
    stock_times: list[float] = field(default_factory=list)
    reuse_times: list[float] = field(default_factory=list)


def _mini_batch(cfg: BenchConfig, rows, starts, uids, advantages, old_log_probs):
    """The bench's rows as verl's V1 mini-batch (verl's remove-padding, dynamic batch size, budget)."""
    from verl.utils import tensordict_utils as tu

    from .backend.harness import rows_tensordict

    extra = dict(old_log_probs=old_log_probs, advantages=advantages)
    prompts = [r[:s] for r, s in zip(rows, starts, strict=True)]
    responses = [r[s:] for r, s in zip(rows, starts, strict=True)]
    data = rows_tensordict(prompts, responses, uids, extra)
    budget = cfg.max_tokens_per_micro_batch
    flags = dict(use_remove_padding=True, use_dynamic_bsz=True, max_token_len_per_gpu=budget, use_fused_kernels=False)
    tu.assign_non_tensor(data, **flags, compute_loss=not cfg.forward_only)
    return data


def check_engine_bench(cfg: BenchConfig) -> None:
    """Raise ValueError naming the flag and the fix before any point runs."""
    if cfg.dtype not in MIXED_PRECISION:
        choices = ", ".join(MIXED_PRECISION)
        raise ValueError(f"--engine true with --dtype={cfg.dtype}: verl's engines compute in {choices}; pick one.")
    if importlib.util.find_spec("verl") is None:
        raise ValueError('--engine true needs verl: pip install -e ".[verl]" (or leave --engine off).')


def run_engine_bench(cfg: BenchConfig, model: torch.nn.Module) -> EngineBenchResult:
    """Save `model`, build the stock and the reuse worker from it, time `cfg.repeats` calls each."""
    from verl.utils import tensordict_utils as tu

    from .backend.cpu import install_cpu_platform
    from .backend.harness import build_worker, init_process_group, ppo_loss_fn, save_word_tokenizer
    from .bench import batch_flop_bound, max_rel_diff, synthetic_groups, timed

    check_engine_bench(cfg)
    device = torch.device(cfg.device)
    if device.type == "cpu":
        install_cpu_platform()
    init_process_group(backend="gloo" if device.type == "cpu" else "cpu:gloo,cuda:nccl")
    precision = MIXED_PRECISION[cfg.dtype]
    engine = dict(
        use_dynamic_bsz=True,
        max_token_len_per_gpu=cfg.max_tokens_per_micro_batch,
        infer_max_token_len_per_gpu=cfg.max_tokens_per_micro_batch,
        micro_batch_size_per_gpu=1,
        infer_micro_batch_size_per_gpu=1,
        model_dtype="fp32",  # fp32 master weights, compute in --dtype: verl's mixed precision
        mixed_precision={"param_dtype": precision, "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
    )
    settings = {
        "attention": cfg.attention,
        "prefix_activations": cfg.prefix_activations,
        "prefix_tree": cfg.prefix_tree,
    }
    loss_fn = ppo_loss_fn()
    with tempfile.TemporaryDirectory(prefix="verl-prefix-bench-") as model_dir:
        model.save_pretrained(model_dir)
        save_word_tokenizer(model_dir, model.config.vocab_size)
        workers = {
            "stock": build_worker(model_dir, reuse=False, **engine),
            "reuse": build_worker(model_dir, reuse=True, prefix_reuse=settings, **engine),
        }
    # the same rows and advantages as the bench's dense and reuse sides; old log-probs random
    rows, starts, uids, advantages = synthetic_groups(cfg, model.config.vocab_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    old_log_probs = [-torch.rand(len(a), generator=gen) - 4.5 for a in advantages]

    def call(name: str, keep: bool = False):
        """One timed pass of worker `name` -> (seconds, its gradients or log-probs when `keep`)."""
        worker = workers[name]
        data = _mini_batch(cfg, rows, starts, uids, advantages, old_log_probs)
        if cfg.forward_only:
            seconds, out = timed(lambda: worker.infer_batch(data), device)
            if not keep:
                return seconds, None
            # full-length rows; verl reads the response part (position t holds token t + 1)
            n = cfg.suffix_len - 1
            return seconds, [torch.cat([lp[-n - 1 : -1] for lp in tu.get(out, "log_probs").unbind()])]
        with worker.engine.train_mode():
            worker.engine.optimizer_zero_grad()
            seconds, _ = timed(lambda: worker.engine.forward_backward_batch(data, loss_fn), device)
            grads = [p.grad.full_tensor().detach().clone() for p in worker.engine.module.parameters()] if keep else None
            worker.engine.optimizer_zero_grad()
        return seconds, grads

    # warm-up, also the comparison
    (_, ref), (_, ours) = call("stock", keep=True), call("reuse", keep=True)
    diff = max_rel_diff(ours, ref)
    times: dict[str, list[float]] = {"stock": [], "reuse": []}
    for _ in range(cfg.repeats):
        for name in ("stock", "reuse"):
            times[name].append(call(name)[0])
    stock_s, reuse_s = statistics.median(times["stock"]), statistics.median(times["reuse"])
    bound = batch_flop_bound(cfg, model.config, dense_lm_head_all=True)  # verl: lm_head at every position
    return EngineBenchResult(
        stock_seconds=stock_s,
        reuse_seconds=reuse_s,
        speedup=stock_s / reuse_s,
        flop_bound=bound,
        efficiency=stock_s / reuse_s / bound,
        max_rel_diff=diff,
        stock_times=times["stock"],
        reuse_times=times["reuse"],
    )
