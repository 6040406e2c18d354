"""Shared fixtures: tiny models built from configs, with injected outlier channels."""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from hypothesis import HealthCheck, settings

# 200 examples per property, without per-example deadlines: the machine is
# shared, and a slow example is not a failure.
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("quick", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Injected outliers: this many times the typical activation on a few channels,
# far above the default 100x-the-mean rule.
OUTLIER_GAIN = 2000.0


@pytest.fixture(autouse=True)
def reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_llama(seed: int = 0, outlier_channels=(3, 17), layers: int = 2):
    """Return a small Llama whose MLP inputs carry outlier channels.

    The outliers go through the post-attention norm only: on the attention
    input they would make q and k so large that softmax saturates, and the
    gradients of q and k would then be noise in fp32 and int8 alike.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[list(outlier_channels)] = OUTLIER_GAIN
    return model


def tiny_peft_llama(seed: int = 0, **kwargs):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed=seed, **kwargs)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))


# Options that let the 64- and 128-wide tiny layers have outlier channels:
# the default cap of 1% rounds down to none below 100 input channels, and
# in 64 channels even one outlier lifts the mean |x| so much that no element
# can exceed 100 times it.
TINY_OPTIONS = {"outlier_max_ratio": 0.05, "outlier_threshold": 10.0}


WORDS = "the a cynic is blackguard whose faulty vision sees things as they are not as they ought to be".split()


@pytest.fixture
def tiny_model_folder(tmp_path):
    vocabulary = ["[UNK]", "<eos>", *dict.fromkeys(WORDS)]
    backend = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(vocabulary)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]")
    model = tiny_llama()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    paragraphs = []
    for _ in range(60):
        picks = torch.randint(0, len(WORDS), (12,), generator=generator)
        paragraphs.append(" ".join(WORDS[i] for i in picks))
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path
