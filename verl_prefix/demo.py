"""`verl-prefix demo`: verl's own PPO trainer loop, stock and with prefix reuse, side by side.

Everything is made locally, no download: a tiny random Qwen3 with a character-level tokenizer
(saved like a hub checkpoint), a synthetic task whose prompts share a long system prompt (the shape
of a RAG or tool-schema context) and a reward a random model can move (the share of digits in the
response). `verl_prefix.main_ppo` then runs twice with the same seed and data, reuse off and on (the
reuse run checks itself against dense in the loop, `verify_every`), with verl's file and TensorBoard
trackers, and `verl-prefix compare` writes the report.

Layout of `--out`: `model/`, `data/`, `baseline/` and `reuse/` (each `metrics.jsonl`, `tensorboard/`,
`train.log`), `report.html`, `report.png`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .compare import Run, compare_runs, load_run

SYSTEM_PROMPT = (
    "You are a careful assistant with access to the tools below. Answer with digits whenever you can.\n"
    "Tool: calculator(expression: str) -> number. Evaluates + - * / and parentheses over integers.\n"
    "Tool: lookup(table: str, key: str) -> str. Reads one cell of a named table; tables: prices, stock,\n"
    "orders, customers. Keys are ids such as 4021 or 7733. Missing keys return an empty string.\n"
    "Tool: convert(value: number, unit: str, to: str) -> number. Units: m, km, g, kg, s, min, h.\n"
    "Rules: never invent ids; quote numbers exactly; reply in one line; prefer numbers to words.\n"
)
QUESTIONS = (
    "How many items are in order {a}?",
    "What is {a} plus {b}?",
    "Convert {a} m to km.",
    "Price of item {a} times {b}?",
    "Stock left for id {a}?",
    "Minutes in {a} hours?",
)
REWARD_SOURCE = '''"""verl-prefix demo reward: the share of digits in the response (a random model can move it)."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    text = solution_str or ""
    return sum(ch.isdigit() for ch in text) / max(1, len(text))
'''
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 128


@dataclass
class DemoConfig:
    """What `verl-prefix demo` runs (flags of the same names)."""

    out: str = "demo"
    steps: int = 4
    device: str = "cpu"  # "cuda": the same runs with vLLM on the GPU
    prompts_per_step: int = 2
    group_size: int = 4  # responses per prompt (rollout.n)
    response_length: int = 16
    seed: int = 0
    overrides: list[str] = field(default_factory=list)  # hydra overrides for both runs

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--steps={self.steps} must be >= 1.")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device={self.device!r}: use cpu or cuda.")
        if self.prompts_per_step < 1 or self.group_size < 2 or self.response_length < 1:
            raise ValueError("--prompts-per-step >= 1, --group-size >= 2 and --response-length >= 1 are needed.")
        for override in self.overrides:
            key, _, value = override.partition("=")
            if (
                self.device == "cpu"
                and key.endswith("ulysses_sequence_parallel_size")
                and value.strip() not in ("1", "")
            ):
                raise ValueError(
                    f"{override} with --device cpu: the demo's stock baseline has no Ulysses attention on CPU "
                    "(verl's patch wraps flash-attn only); scripts/check_sp_e2e.py runs the reuse loop at "
                    "sp=2 against sp=1 instead."
                )


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, data


def save_tokenizer(path: Path) -> int:
    """A character-level tokenizer with ChatML special tokens, exactly VOCAB_SIZE long (vLLM bans
    sampled ids >= len(tokenizer) but the trainer does not, so the two must agree with vocab_size)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"<|extra_{i}|>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    assert len(fast) == VOCAB_SIZE, len(fast)
    return len(fast)


def save_model(path: Path, seed: int) -> None:
    """Tiny random Qwen3 (head_dim 32: vLLM's CPU attention needs >= 32), fp32 weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from .random_models import model_config

    vocab = save_tokenizer(path)
    config = model_config(
        "qwen3",
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        vocab_size=vocab,
        max_positions=2048,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        dtype="float32",
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def write_dataset(path: Path, rows: int, seed: int) -> tuple[Path, Path]:
    """verl's RL parquet layout: chat `prompt`, `data_source`, `reward_model`, `extra_info`."""
    import random

    import pandas as pd

    rng = random.Random(seed)
    records = []
    for i in range(rows):
        question = rng.choice(QUESTIONS).format(a=rng.randint(10, 9999), b=rng.randint(2, 99))
        records.append(
            {
                "data_source": "verl_prefix_demo",
                "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
                "ability": "tools",
                "reward_model": {"style": "rule", "ground_truth": ""},
                "extra_info": {"index": i, "split": "train"},
            }
        )
    path.mkdir(parents=True, exist_ok=True)
    train, val = path / "train.parquet", path / "val.parquet"
    pd.DataFrame(records).to_parquet(train)
    pd.DataFrame(records[:2]).to_parquet(val)
    (path / "reward.py").write_text(REWARD_SOURCE)
    return train, val


# ---------------------------------------------------------------------------------------------
# The two runs


def run_overrides(cfg: DemoConfig, out: Path, reuse: bool) -> list[str]:
    """Hydra overrides of one run (cfg.overrides appended last, so they win)."""
    model, data = out / "model", out / "data"
    overrides = [
        "algorithm.adv_estimator=grpo",
        f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'val.parquet'}",
        f"data.train_batch_size={cfg.prompts_per_step}",
        "data.max_prompt_length=640",
        f"data.max_response_length={cfg.response_length}",
        "data.dataloader_num_workers=0",
        f"data.seed={cfg.seed}",
        f"reward.custom_reward_function.path={data / 'reward.py'}",
        "reward.num_workers=1",
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.model.use_remove_padding=True",
        "actor_rollout_ref.model.enable_gradient_checkpointing=True",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.ref.strategy=fsdp2",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={cfg.prompts_per_step}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.ref.use_torch_compile=False",
        "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        "actor_rollout_ref.rollout.name=vllm",
        f"actor_rollout_ref.rollout.n={cfg.group_size}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.enforce_eager=True",
        "actor_rollout_ref.rollout.free_cache_engine=False",
        "+actor_rollout_ref.rollout.enable_sleep_mode=False",
        "actor_rollout_ref.rollout.max_model_len=1024",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes=64",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        f"trainer.total_training_steps={cfg.steps}",
        "trainer.project_name=verl_prefix_demo",
        f"trainer.experiment_name={'reuse' if reuse else 'baseline'}",
        "trainer.logger=[console,file,tensorboard]",
        f"actor_rollout_ref.actor.prefix_reuse.enable={str(reuse).lower()}",
        # the critic, used with algorithm.adv_estimator=gae (a value head on the same tiny model)
        f"critic.model.path={model}",
        f"critic.model.tokenizer_path={model}",
        "critic.model.use_remove_padding=True",
        "critic.model.enable_gradient_checkpointing=True",
        "+critic.model.override_config.attn_implementation=sdpa",
        "critic.strategy=fsdp2",
        "critic.fsdp.model_dtype=fp32",
        "+critic.fsdp.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        "critic.fsdp.use_torch_compile=False",
        f"critic.ppo_mini_batch_size={cfg.prompts_per_step}",
        "critic.ppo_micro_batch_size_per_gpu=8",
        f"critic.prefix_reuse.enable={str(reuse).lower()}",
    ]
    if reuse:
        # the in-loop dense check doubles an update's work: once, at the last step, so the steps
        # before it time the reuse update alone
        overrides.append(f"actor_rollout_ref.actor.prefix_reuse.verify_every={cfg.steps}")
        overrides.append(f"critic.prefix_reuse.verify_every={cfg.steps}")
    if cfg.device == "cpu":
        overrides += ["trainer.device=cpu", "+ray_kwargs.ray_init.num_gpus=1", "ray_kwargs.ray_init.num_cpus=8"]
    return overrides + list(cfg.overrides)


def run_env(cfg: DemoConfig, run_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VERL_FILE_LOGGER_PATH=str(run_dir / "metrics.jsonl"),
        TENSORBOARD_DIR=str(run_dir / "tensorboard"),
        RAY_AUTH_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
    )
    if cfg.device == "cpu":
        # verl's CPU platform in every process (verl_prefix.backend.cpu); the vLLM replica reads its
        # accelerator id from Ray under the platform's resource name, so the workers take fake GPUs
        env.update(VERL_PLATFORM="cpu", VERL_PREFIX_CPU_RAY_RESOURCE="GPU", VLLM_CPU_KVCACHE_SPACE="1")
    return env


def run_one(cfg: DemoConfig, out: Path, reuse: bool) -> Path:
    """One `verl_prefix.main_ppo` run; its output goes to `train.log`, a progress line to stderr."""
    run_dir = out / ("reuse" if reuse else "baseline")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    command = [sys.executable, "-m", "verl_prefix.main_ppo", *run_overrides(cfg, out, reuse)]
    (run_dir / "command.txt").write_text(" ".join(command) + "\n")
    label = "reuse   " if reuse else "baseline"
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=run_env(cfg, run_dir), cwd=run_dir)
        while proc.poll() is None:
            time.sleep(2)
            done = _steps_logged(run_dir / "metrics.jsonl")
            print(f"\r{label} step {done}/{cfg.steps}  {time.perf_counter() - start:5.0f} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"the {label.strip()} run failed (exit {proc.returncode}); see {run_dir / 'train.log'}")
    return run_dir


def _steps_logged(path: Path) -> int:
    """Complete lines of the file tracker's JSONL (one per finished step)."""
    return path.read_text().count("\n") if path.exists() else 0


# logged figures that measure the machine (time, throughput, memory, the in-loop check), not training
MEASURED = ("timing", "perf/", "_seconds", "_memory_", "verify_")


def step_records(path: Path) -> dict[int, dict]:
    """The file tracker's JSONL as {training/global_step: that step's record}."""
    records = [json.loads(line)["data"] for line in path.read_text().splitlines() if line.strip()]
    return {r["training/global_step"]: r for r in records}


def training_figures(record: dict) -> dict[str, float]:
    """A step record's numeric figures of training (the MEASURED ones left out): what two runs on
    the same rollouts must agree on."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not any(m in k for m in MEASURED)}


VERIFY_KEY = "actor/prefix_reuse/verify_max_grad_rel_diff"


def _values(run: Run, key: str, steps: set[int] | None = None) -> list[float]:
    return [v for step, v in run.series.get(key, []) if steps is None or step in steps]


def _update_seconds(run: Run) -> list[float]:
    """`timing_s/update_actor` of the steps that time the update alone: not the first (warm-up)
    when others remain, not a step that also ran the dense check."""
    verified = {step for step, _ in run.series.get(VERIFY_KEY, [])}
    clean = [step for step, _ in run.series.get("timing_s/update_actor", []) if step not in verified]
    return _values(run, "timing_s/update_actor", set(clean[1:] if len(clean) > 1 else clean))


def summary(baseline: Run, reuse: Run, report: Path) -> str:
    """One line: update time dense vs reuse, speedup, tokens saved, verify difference, report path."""
    t_base, t_reuse = _update_seconds(baseline), _update_seconds(reuse)
    prefix = _values(reuse, "actor/prefix_reuse/prefix_tokens")
    suffix = _values(reuse, "actor/prefix_reuse/suffix_tokens")
    dense = _values(reuse, "actor/prefix_reuse/dense_tokens")
    verify = _values(reuse, VERIFY_KEY)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    saved = 1 - (sum(prefix) + sum(suffix)) / sum(dense) if dense else float("nan")
    return (
        f"update_actor {mean(t_base):.2f} s stock vs {mean(t_reuse):.2f} s reuse "
        f"({mean(t_base) / mean(t_reuse):.2f}x); tokens computed {100 * saved:.0f}% fewer; "
        f"verify max grad rel diff {max(verify) if verify else float('nan'):.1e}; report {report}"
    )


def run_demo(cfg: DemoConfig) -> int:
    cfg.check()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"demo: writing model and data to {out}", file=sys.stderr)
    save_model(out / "model", cfg.seed)
    write_dataset(out / "data", rows=cfg.prompts_per_step * cfg.steps * 2, seed=cfg.seed)
    for reuse in (False, True):
        run_one(cfg, out, reuse)
    baseline = load_run(out / "baseline" / "metrics.jsonl", "baseline")
    reuse = load_run(out / "reuse" / "metrics.jsonl", "reuse")
    paths = compare_runs(baseline, reuse, out / "report_files")
    (out / "report.png").write_bytes(paths.png.read_bytes())
    (out / "report.html").write_text(paths.html.read_text(encoding="utf-8"), encoding="utf-8")
    print(summary(baseline, reuse, out / "report.html"))
    return 0
