"""Tiny Llamas, batches and a graph walk shared by the fused-layer, attention and benchmark
tests. No tests here."""

from __future__ import annotations

import contextlib

import torch

from peftbench.methods import get_method
from peftbench.models import load_model


def tiny_lora_llama(method_args: dict | None = None) -> torch.nn.Module:
    """``tiny-random-llama`` with peftbench's LoRA (``method_args`` over its defaults), in
    train mode, seeded; ``B`` drawn at random (peft starts it at zero, where the adapter
    contributes nothing and every ``A`` gradient is zero)."""
    loaded = load_model("tiny-random-llama", seed=0)
    lora = get_method("lora")
    torch.manual_seed(0)
    model = lora.apply(loaded.model, lora.resolve_args(method_args or {}),
                       encoder_decoder=False).train()
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model


#: two rows of token ids for the tiny Llamas
IDS = torch.tensor([[5, 17, 9, 33, 41, 8, 12], [7, 3, 60, 2, 19, 25, 4]])


def padded_batch() -> dict[str, torch.Tensor]:
    """:data:`IDS` with the second row right-padded: the attention mask reaches the kernel."""
    mask = torch.ones_like(IDS)
    mask[1, 5:] = 0
    return {"input_ids": IDS, "attention_mask": mask, "labels": IDS.masked_fill(mask == 0, -100)}


def grouped_query_llama(kv_heads: int) -> torch.nn.Module:
    """The tiny Llama's shape (4 query heads) with ``kv_heads`` key/value heads, seeded, in
    train mode."""
    from transformers import LlamaForCausalLM

    config = load_model("tiny-random-llama", seed=0).model.config
    config.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def greedy_generations(switch, autocast=contextlib.nullcontext) -> list[torch.Tensor]:
    """Five greedy tokens after ``IDS[:1]`` from the tiny Llama as loaded and after
    ``switch(model)`` (an attention switch), each under ``autocast()``."""
    outputs = []
    for switched in (False, True):
        model = load_model("tiny-random-llama", seed=0).model.eval()
        if switched:
            switch(model)
        with torch.no_grad(), autocast():
            outputs.append(model.generate(IDS[:1], attention_mask=torch.ones_like(IDS[:1]),
                                          max_new_tokens=5, do_sample=False))
    return outputs


def graph_nodes(output: torch.Tensor) -> list[str]:
    """The class names of every autograd node behind ``output`` (each node once)."""
    seen, names, stack = set(), [], [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names
