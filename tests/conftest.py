"""Shared fixtures: unit tables built from configs alone (meta device) and tiny random-init models built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from qsweep.model import meta_model, unit_table

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def model_cfg(name: str, **overrides) -> dict:
    cfg = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
    cfg.update(overrides)
    return cfg


def tiny_config(arch: str):
    """A few-thousand-parameter config of each supported architecture family."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=64)
    if arch == "opt":
        return OPTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            ffn_dim=64,
            vocab_size=101,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
    if arch == "llama":
        return LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            vocab_size=101,
            max_position_embeddings=64,
        )
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa")
    return model.float().eval()


@pytest.fixture(scope="session")
def gpt2_small_table():
    """GPT-2 small's unit table at the seed's granularity, from the config alone (no weights, no download)."""
    from transformers import GPT2Config

    return unit_table(meta_model(GPT2Config()), model_cfg("gpt2"))
