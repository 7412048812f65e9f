"""The FLOP bound reproduces the worked Llama3-8B figures of docs/design.md."""

import pytest
from transformers import LlamaConfig

from verl_prefix.core import FlopModel

LLAMA3_8B = LlamaConfig(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)


@pytest.mark.parametrize(
    "prefix,suffix,group,expected",
    [
        (8192, 1024, 8, 4.27),
        (4096, 512, 16, 5.76),
        (16384, 1024, 8, 5.33),
        (32768, 2048, 16, 7.28),
        (1024, 2048, 8, 1.39),
    ],
)
def test_design_doc_figures(prefix, suffix, group, expected):
    flops = FlopModel.from_config(LLAMA3_8B)
    # docs/design.md's figures charge the reuse side an lm_head over the prefix too.
    conservative = flops.training_ratio([prefix], [[suffix] * group], prefix_lm_head=True)
    assert conservative == pytest.approx(expected, abs=0.006)
    # The schedule skips the prefix lm_head, so its own bound is higher; recompute costs a prefix forward.
    assert flops.training_ratio([prefix], [[suffix] * group]) > conservative
    assert flops.training_ratio([prefix], [[suffix] * group], recompute=True) < conservative


def test_nothing_shared_is_ratio_one():
    flops = FlopModel.from_config(LLAMA3_8B)
    assert flops.training_ratio([0, 0], [[100], [37]]) == pytest.approx(1.0)
