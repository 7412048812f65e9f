"""Bad input raises ValueError naming the argument and the fix."""

import pytest
import torch
from tiny_models import build
from transformers import T5Config, T5ForConditionalGeneration

from verl_prefix.core import PrefixReuseConfig, compute_log_probs, forward_backward


def loss_fn(indices, log_probs):
    return sum(lp.sum() for lp in log_probs)


@pytest.fixture(scope="module")
def model():
    return build("qwen3", torch.float32)


ROWS = [torch.arange(1, 9), torch.arange(1, 8)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_ids=[]), "input_ids is empty"),
        (dict(response_start=[4]), "one entry per row"),
        (dict(group_ids=[0]), "one entry per row"),
        (dict(input_ids=[torch.arange(1, 9), torch.tensor([3])]), r"input_ids\[1\] has 1 tokens"),
        (dict(input_ids=[torch.arange(1, 9), torch.zeros(0, dtype=torch.long)]), r"input_ids\[1\] has 0 tokens"),
        (dict(input_ids=[torch.arange(1, 9), torch.ones(2, 3, dtype=torch.long)]), r"input_ids\[1\] must be a 1-D"),
        (dict(response_start=[0, 4]), r"response_start\[0\]=0"),
        (dict(response_start=[4, 7]), r"response_start\[1\]=7 must be an int in \[1, 6\]"),
        (dict(config=PrefixReuseConfig(attention="xformers")), "attention='xformers' is unknown"),
        (dict(config=PrefixReuseConfig(prefix_activations="disk")), "prefix_activations='disk'"),
        (dict(config=PrefixReuseConfig(max_tokens_per_micro_batch=0)), "max_tokens_per_micro_batch=0"),
        (dict(config=PrefixReuseConfig(min_prefix_tokens=0)), "min_prefix_tokens=0"),
        (dict(config=PrefixReuseConfig(temperature=0.0)), "temperature=0.0"),
        (dict(config=PrefixReuseConfig(attention="flash_attn")), "flash_attn"),
        (dict(config=PrefixReuseConfig(attention="flex")), "FlexAttention has no CPU backward"),
        # one row holds the other whole: only one prefix per group id keeps the suffix over the budget
        (dict(config=PrefixReuseConfig(max_tokens_per_micro_batch=3, prefix_tree=False)), "raise max_tokens_per"),
        (dict(loss_fn="mean"), "loss_fn must be callable"),
    ],
)
def test_bad_input(model, kwargs, match):
    args = dict(input_ids=ROWS, response_start=[4, 4], group_ids=[0, 0], loss_fn=loss_fn, config=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        forward_backward(model, **args)


def test_non_causal_model():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="decoder-only transformers causal LM"):
        compute_log_probs(t5, ROWS, [4, 4], [0, 0])


def test_attention_that_bypasses_the_interface(model, monkeypatch):
    attn = model.model.layers[1].self_attn
    monkeypatch.setattr(attn, "forward", lambda hidden_states, **kw: (torch.zeros_like(hidden_states), None))
    with pytest.raises(ValueError, match="cannot be hooked"):
        compute_log_probs(model, ROWS, [4, 4], [0, 0])


def test_attention_implementation_restored_after_error(model):
    before = model.config._attn_implementation
    with pytest.raises(ValueError):
        forward_backward(model, ROWS, [4, 4], [0, 0], lambda i, lp: (_ for _ in ()).throw(ValueError("boom")))
    assert model.config._attn_implementation == before


def test_sliding_window_is_refused():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=0,
    )
    sliding = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="sliding-window"):
        compute_log_probs(sliding, ROWS, [4, 4], [0, 0])
