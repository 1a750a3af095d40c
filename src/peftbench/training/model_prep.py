"""From a loaded base model to the model that trains: shared by the loop and the benchmark."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from transformers import set_seed

from peftbench.config import RunSpec
from peftbench.methods import get_method
from peftbench.methods.base import Method
from peftbench.models.base import LoadedModel
from peftbench.training import cpu_kernels, lora_kernel, recomputed_attention
from peftbench.training.dropout import use_fast_dropout
from peftbench.training.encoding import Encoded, collate, to_device
from peftbench.training.fused_lora import fuse_lora_layers, kernel_rank_layers
from peftbench.training.fused_rms_norm import fuse_rms_norms
from peftbench.training.fused_rotary import fuse_rotary
from peftbench.training.heap import steady_heap
from peftbench.training.lean_attention import use_lean_attention
from peftbench.training.objective import supports_gathered_logits
from peftbench.training.precision import (
    copy_out_of_checkpoint,
    lora_inputs_uncast,
    store_frozen_in_bf16,
)
from peftbench.training.recomputed_attention import use_recomputed_attention
from peftbench.training.rms_norm import recompute_norm_outputs
from peftbench.training.swiglu import compile_silu_gates, fuse_silu_gates


def attach_method(spec: RunSpec, loaded: LoadedModel) -> tuple[Method, dict[str, Any], nn.Module]:
    """The method's resolved arguments and the adapted model, seeded just before it is built."""
    method = get_method(spec.method)
    args = method.resolve_args(spec.method_args)
    set_seed(spec.seed)
    model = method.apply(loaded.model, args, encoder_decoder=loaded.is_encoder_decoder)
    return method, args, model


def place_for_training(model: nn.Module, precision: str, device: torch.device,
                       exact: bool = False) -> dict[str, int]:
    """Move to ``device`` and apply the fast path for the resolved ``precision``; returns
    what was applied (counts of tensors / modules), for the run record.

    bf16: frozen matrices stored in bf16 once, LoRA inputs not copied to fp32 and, on CPU,
    the checkpoint file's mapping released. On CPU, unless ``exact``: dropout with cheap
    masks (:mod:`~peftbench.training.dropout`), plain LoRA layers as one autograd function
    (:mod:`~peftbench.training.fused_lora`; under bf16 autocast
    :mod:`~peftbench.training.fused_lora_bf16`); in bf16, Llama-style RMSNorms as one
    autograd function returning bf16 under autocast
    (:mod:`~peftbench.training.fused_rms_norm`), attention keeping only its bf16 inputs
    (:mod:`~peftbench.training.recomputed_attention`) and the gated MLPs' ``silu(gate) *
    up`` routed through :mod:`~peftbench.training.swiglu`; the norms, the gates and the
    rotary embedding (:mod:`~peftbench.training.fused_rotary`) run as one compiled pass each
    way where a C compiler is available
    (:mod:`~peftbench.training.cpu_kernels`), and so do the LoRA layers' adapter products
    and dropout (:mod:`~peftbench.training.lora_kernel`); in fp32, the gated
    MLPs' SiLU and product and the RMSNorms' outputs computed again in the backward
    (:mod:`~peftbench.training.swiglu`, :mod:`~peftbench.training.rms_norm`) and
    attention keeping its keys and values once per group and its mask once per forward
    (:mod:`~peftbench.training.lean_attention`). ``exact`` fp32 (an explicit
    ``precision: fp32``) changes nothing: it is the reference that must match a plain
    Hugging Face run step for step, dropout masks included. On CPU, for every precision,
    glibc's heap is kept steady (:mod:`~peftbench.training.heap`), which changes no
    arithmetic.
    """
    model.to(device)
    applied: dict[str, int] = {}
    if device.type == "cpu":
        applied["steady_heap"] = steady_heap()
    if precision == "bf16":
        applied["frozen_bf16_elements"] = store_frozen_in_bf16(model)
        applied["lora_inputs_uncast"] = lora_inputs_uncast(model)
        if device.type == "cpu":
            applied["copied_out_of_checkpoint"] = copy_out_of_checkpoint(model)
    if device.type == "cpu" and not (exact and precision == "fp32"):
        applied["fast_dropout"] = use_fast_dropout(model)
        applied["fused_lora"] = fuse_lora_layers(model)
        if precision == "bf16":
            applied["fused_rms_norm"] = fuse_rms_norms(model)
            applied["recomputed_attention"] = use_recomputed_attention(model)
            applied["fused_rotary"] = fuse_rotary(model)
            applied["silu_gate_kernel"] = compile_silu_gates(model)
            applied["rms_norm_kernel"] = cpu_kernels.running(applied["fused_rms_norm"],
                                                             cpu_kernels.rms_norm_enabled)
            applied["lora_kernel"] = cpu_kernels.running(kernel_rank_layers(model),
                                                         lora_kernel.enabled)
            applied["lora_kernel_bf16_dot"] = (applied["lora_kernel"] > 0
                                               and cpu_kernels.bf16_dot())
            applied["attention_kernel"] = cpu_kernels.running(
                applied["recomputed_attention"],
                recomputed_attention.kernel_enabled and cpu_kernels.bf16_dot())
        if precision == "fp32":
            applied["silu_gates_recomputed"] = fuse_silu_gates(model)
            applied["norm_outputs_recomputed"] = recompute_norm_outputs(model)
            applied["lean_attention"] = use_lean_attention(model)
    return applied


def forward_for_training(model: nn.Module, spec: RunSpec) -> nn.Module:
    """The module the training step calls: ``model`` itself, or with ``spec.compile`` a
    ``torch.compile`` wrapper sharing its parameters (dynamic shapes: batches vary in
    length). Evaluation keeps calling ``model``: generation's shapes would recompile."""
    if not spec.compile:
        return model
    return torch.compile(model, dynamic=True)


def use_gathered_logits(model: nn.Module, train_set: Sequence[Encoded], pad_id: int,
                        device: torch.device, autocast: Callable[[], AbstractContextManager],
                        encoder_decoder: bool) -> bool:
    """Whether the LM head may run at target positions only (decoder models that allow it)."""
    if encoder_decoder:
        return False
    probe = to_device(collate(train_set[:4], pad_id), device)
    return supports_gathered_logits(model, probe, autocast)
