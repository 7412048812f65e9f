"""The bench under Ulysses sequence parallelism: reuse vs dense, both at sp = N.

N processes (gloo on CPU, NCCL with one GPU each) form one sequence-parallel group with verl's
collectives (`verl_prefix.backend.ulysses`) and hold the bench's rows. Dense is the schedule with
every row its own group (nothing shared: each row runs whole, split over the group, as a dense
sp trainer runs it); reuse is the schedule with the bench's groups. Same model, rows, loss and
token budget (per pass, over the group); times are rank 0's, alternating, after one warm-up that
also compares the two sides' gradients (group mean, as FSDP reduces them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .bench import BenchConfig


@dataclass
class SequenceParallelBenchResult:
    size: int  # ranks in the sequence-parallel group
    threads_per_rank: int
    dense_seconds: float  # median over repeats, rank 0
    reuse_seconds: float
    speedup: float
    flop_bound: float
    efficiency: float
    max_grad_rel_diff: float  # group-mean gradients, reuse vs dense (forward-only: log-probs)
    dense_times: list[float] = field(default_factory=list)
    reuse_times: list[float] = field(default_factory=list)


def check_sp_bench(cfg: BenchConfig) -> None:
    """Raise ValueError naming the flag and the fix before any point runs."""
    size = cfg.sequence_parallel
    if size < 1:
        raise ValueError(f"--sequence-parallel={size} must be >= 1 (1 = off).")
    if size == 1:
        return
    if importlib.util.find_spec("verl") is None:
        raise ValueError('--sequence-parallel > 1 uses verl\'s Ulysses collectives: pip install -e ".[verl]".')
    if cfg.device.startswith("cuda") and torch.cuda.device_count() < size:
        raise ValueError(
            f"--sequence-parallel={size} on CUDA needs {size} GPUs (one per rank), this machine has "
            f"{torch.cuda.device_count()}; lower it or use --device=cpu."
        )


def run_sp_bench(cfg: BenchConfig) -> SequenceParallelBenchResult:
    """Spawn the group, time it, return rank 0's figures."""
    import torch.multiprocessing as mp

    from .backend.harness import free_port

    check_sp_bench(cfg)
    with tempfile.TemporaryDirectory(prefix="verl-prefix-sp-bench-") as out:
        mp.start_processes(
            _rank,
            args=(cfg, free_port(), out),
            nprocs=cfg.sequence_parallel,
            join=True,
            start_method="spawn",
        )
        with open(os.path.join(out, "result.json")) as f:
            return SequenceParallelBenchResult(**json.load(f))


def _rank(rank: int, cfg: BenchConfig, port: int, out: str) -> None:
    from .backend.harness import init_process_group
    from .backend.ulysses import sequence_parallel
    from .bench import batch_flop_bound, build_model, max_rel_diff, policy_loss, synthetic_groups, timed
    from .core import ScheduleRuntime, compute_log_probs, forward_backward

    size = cfg.sequence_parallel
    cuda = cfg.device.startswith("cuda")
    threads = max(1, (os.cpu_count() or 1) // size)
    torch.set_num_threads(threads)
    if cuda:
        torch.cuda.set_device(rank)
    init_process_group(rank, size, port, backend="nccl" if cuda else "gloo")
    group = torch.distributed.group.WORLD
    runtime = ScheduleRuntime(sequence_parallel=sequence_parallel(group))
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    model = build_model(cfg, cfg.row_len).to(device)  # the seed's weights, the same on every rank
    rows, starts, uids, advantages = synthetic_groups(cfg, model.config.vocab_size)
    rows, advantages = [r.to(device) for r in rows], [a.to(device) for a in advantages]
    loss_fn = policy_loss(advantages, sum(len(a) for a in advantages))
    config = cfg.schedule_config(cfg.max_tokens_per_micro_batch)
    groups = {"dense": [f"row-{i}" for i in range(len(rows))], "reuse": uids}

    def step(side: str):
        if cfg.forward_only:
            return torch.cat(compute_log_probs(model, rows, starts, groups[side], config, runtime=runtime))
        forward_backward(model, rows, starts, groups[side], loss_fn, config, runtime=runtime)
        return None

    def outputs(side: str) -> list[torch.Tensor]:
        out = step(side)
        if out is not None:
            return [out]
        grads = []
        for p in model.parameters():
            g = p.grad.detach().clone()
            torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.AVG, group=group)
            grads.append(g)
        model.zero_grad(set_to_none=True)
        return grads

    dense, reuse = outputs("dense"), outputs("reuse")
    diff = max_rel_diff(reuse, dense)
    del dense, reuse
    times: dict[str, list[float]] = {"dense": [], "reuse": []}
    for _ in range(cfg.repeats):
        for side in ("dense", "reuse"):
            torch.distributed.barrier(group)
            times[side].append(timed(lambda side=side: step(side), device)[0])
            model.zero_grad(set_to_none=True)
    if rank == 0:
        dense_s, reuse_s = statistics.median(times["dense"]), statistics.median(times["reuse"])
        bound = batch_flop_bound(cfg, model.config, dense_lm_head_all=False)  # both sides: response logits only
        result = SequenceParallelBenchResult(
            size=size,
            threads_per_rank=threads,
            dense_seconds=dense_s,
            reuse_seconds=reuse_s,
            speedup=dense_s / reuse_s,
            flop_bound=bound,
            efficiency=dense_s / reuse_s / bound,
            max_grad_rel_diff=diff,
            dense_times=times["dense"],
            reuse_times=times["reuse"],
        )
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(asdict(result), f)
    torch.distributed.destroy_process_group()
