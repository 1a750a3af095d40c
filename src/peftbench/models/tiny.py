"""Tiny randomly initialised T5 and Llama models for tests (never pretrained).

Shapes follow the real families so that module names match what methods target:
the T5 uses FLAN-T5's gated-gelu feed-forward (``wi_0``, ``wi_1``, ``wo``) and untied
embeddings; the Llama uses grouped-query attention and tied embeddings like SmolLM2.
The same seed gives the same weights; the caller's RNG state is left untouched.
"""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from peftbench.models.base import LoadedModel
from peftbench.models.registry import TINY_SOURCE
from peftbench.models.tokenizer_tiny import build_tiny_tokenizer, tokenizer_digest


def tiny_t5_config(vocab_size: int) -> T5Config:
    """A 2+2-layer FLAN-T5-shaped config (d_model 64)."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """A 2-layer SmolLM2-shaped config (hidden 64, 4 heads, 2 kv heads, tied embeddings)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )


def _fingerprint(config_dict: dict, seed: int, vocab_digest: str) -> str:
    config_dict = {k: v for k, v in config_dict.items() if k != "transformers_version"}
    payload = json.dumps({"config": config_dict, "seed": seed, "tokenizer": vocab_digest},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def load_tiny(name: str, *, seed: int = 0) -> LoadedModel:
    """Build ``tiny-random-t5`` or ``tiny-random-llama`` on CPU in fp32."""
    is_t5 = name == "tiny-random-t5"
    tokenizer = build_tiny_tokenizer("t5" if is_t5 else "llama")
    config = tiny_t5_config(len(tokenizer)) if is_t5 else tiny_llama_config(len(tokenizer))
    model_cls = T5ForConditionalGeneration if is_t5 else LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.to(torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        is_encoder_decoder=is_t5,
        pretrained=False,
        fingerprint=_fingerprint(config.to_dict(), seed, tokenizer_digest(tokenizer)),
        source=f"{TINY_SOURCE}, seed {seed}",
    )
