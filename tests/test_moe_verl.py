"""The router aux-loss setting through verl's engine: reuse on and reuse off (our dense path) add
the same aux loss, so they give the same gradient; stock verl adds none.

Real parts: verl 0.9.1 TrainingWorker and FSDP engine, FSDP2 over gloo, verl's ppo_loss, a tiny
random Qwen3-MoE. CPU-only stand-in: verl_support's CPU platform (verl has none). fp32.
"""

from __future__ import annotations

import verl_support as vs
from dense_reference import rel_err
from test_verl_engine import actor_loss, engine_kwargs, grads_of

vs.install_cpu_platform()
vs.init_process_group()

GROUPS = [(20, [3, 7, 2, 5]), (14, [4, 1, 6]), (9, [2])]
AUX = {"router_aux_loss": True, "router_aux_loss_coef": 0.5}


def test_reuse_and_dense_paths_add_the_same_aux_loss(tmp_path):
    model_dir = vs.save_tiny_qwen3(str(tmp_path / "moe"), moe=True)
    # The aux loss is not linear in the micro-batch's token statistics, so "the same loss" needs the
    # same partition: one micro-batch on both paths (verl's dense packing and the suffix packing
    # differ at smaller budgets; the core test compares split micro-batches against dense).
    kwargs = {**engine_kwargs(True), "max_token_len_per_gpu": 4096, "infer_max_token_len_per_gpu": 4096}
    stock = vs.build_worker(model_dir, reuse=False, **kwargs)
    dense = vs.build_worker(model_dir, reuse=True, prefix_reuse={"enable": False, **AUX}, **kwargs)
    reuse = vs.build_worker(model_dir, reuse=True, prefix_reuse=AUX, **kwargs)
    loss_fn = actor_loss()
    stock_grads, _ = grads_of(stock, vs.make_batch(GROUPS), loss_fn)
    dense_grads, dense_out = grads_of(dense, vs.make_batch(GROUPS), loss_fn)
    reuse_grads, reuse_out = grads_of(reuse, vs.make_batch(GROUPS), loss_fn)

    assert reuse_out["metrics"]["prefix_reuse/groups"] == [2.0]
    assert reuse_out["metrics"]["prefix_reuse/micro_batches"] == [1.0]
    assert "prefix_reuse/groups" not in dense_out["metrics"]
    gate = next(n for n in stock_grads if n.endswith("mlp.gate.weight"))
    assert rel_err(dense_grads[gate], stock_grads[gate]) > 1e-2  # the aux loss is really added
    for name, ref in dense_grads.items():
        assert rel_err(reuse_grads[name], ref) <= 5e-5, (name, rel_err(reuse_grads[name], ref))
