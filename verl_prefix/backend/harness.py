"""verl's real engines in one process, for the bench's stock-engine peer and the tests.

`build_worker` makes verl 0.9.1's own `TrainingWorker` (FSDP2, fp32 master weights) with the stock
engine class or verl-prefix's; `rows_tensordict` lays rows out as verl's V1 trainer hands a mini-batch
to the engine (nested rows, response fields, uid). On a CPU machine call `install_cpu_platform`
(`verl_prefix.backend.cpu`) first and use a gloo process group (`init_process_group`).
"""

from __future__ import annotations

import os
import socket

import torch


def save_word_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer of exactly `vocab_size` tokens (t0, t1, ..., then <pad>, <eos>, <unk>:
    ids vocab_size - 3 .. - 1), saved like a hub tokenizer next to a random model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n = vocab_size - 3
    vocab = {f"t{i}": i for i in range(n)} | {"<pad>": n, "<eos>": n + 1, "<unk>": n + 2}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int = 0, world_size: int = 1, port: int | None = None, backend: str = "gloo") -> None:
    """A process group (gloo by default; idempotent for world size 1)."""
    if torch.distributed.is_initialized():
        return
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port or free_port())
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(rank), str(world_size)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)


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
