"""Mixed-precision parity report (not a test): `python tests/parity_report.py [--seeds 0,1,2,3]`.

Per model and seed, through verl's engines on CPU: the worst per-tensor ratio
max|g - g_ref| / floor, where g_ref is the stock engine in fp32 and floor = max over the stock
engine's two layouts (use_remove_padding true/false) of max|g_stock - g_ref| in the same reduced
precision. Rows: verl-prefix ("reuse") and, as the stock engine's own spread, the stock engine with
another micro-batch budget ("stock, other budget"). docs/benchmarks.md quotes its output.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import verl_support as vs  # noqa: E402

vs.install_cpu_platform()
vs.init_process_group()

from test_mixed_precision import GROUPS, KWARGS, STOCK_LAYOUTS, WIDTH, _excess, _mixed  # noqa: E402
from test_verl_engine import actor_loss, grads_of  # noqa: E402

MODELS = {
    "qwen3": {},
    "qwen3_moe top-4 of 4": {"moe": True, "num_experts_per_tok": 4},
    "qwen3_moe top-2 of 4": {"moe": True},
}


def scaled_grads(model_dir: str, reuse: bool, dtype: str | None, seed: int, **kwargs) -> dict:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    extra = _mixed(dtype) if dtype else {}
    worker = vs.build_worker(model_dir, reuse, **{**KWARGS, **extra, **kwargs})
    scale = 1.0
    if dtype == "fp16":  # verl's scaler disables itself without CUDA: a CPU one, same settings
        scale = 2.0**12
        worker.engine.scaler = ShardedGradScaler(device="cpu", init_scale=scale, growth_interval=400)
    grads = grads_of(worker, vs.make_batch(GROUPS, seed=seed, calculate_entropy=True), actor_loss(0.01))[0]
    return {n: g / scale for n, g in grads.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2,3")
    args = parser.parse_args()
    print("| model | dtype | seed | reuse: worst tensor, ratio | stock, other budget: worst ratio |")
    print("|---|---|---|---|---|")
    cases = [(m, "bf16") for m in MODELS] + [("qwen3", "fp16")]
    for name, dtype in cases:
        for seed in (int(s) for s in args.seeds.split(",")):
            model_dir = vs.save_tiny_qwen3(tempfile.mkdtemp(), seed=seed, **MODELS[name], **WIDTH)
            ref = scaled_grads(model_dir, False, None, seed)
            stocks = [scaled_grads(model_dir, False, dtype, seed, **layout) for layout in STOCK_LAYOUTS]
            ours = _excess(scaled_grads(model_dir, True, dtype, seed), stocks, ref)
            other = _excess(scaled_grads(model_dir, False, dtype, seed, max_token_len_per_gpu=48), stocks, ref)
            worst = max(ours, key=ours.get)
            print(f"| {name} | {dtype} | {seed} | {worst} {ours[worst]:.2f} | {max(other.values()):.2f} |", flush=True)


if __name__ == "__main__":
    main()
