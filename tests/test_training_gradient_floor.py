"""When only later layers are trainable, autograd records nothing below the lowest one: the
backward stops there instead of computing gradients nobody uses."""

from __future__ import annotations

import pytest
import torch

from peftbench.methods import get_method
from peftbench.models import load_model
from peftbench.training.model_prep import place_for_training

IDS = torch.tensor([[5, 17, 9, 33, 41, 8, 12], [7, 3, 60, 2, 19, 25, 4]])


def _layer_outputs_with_graph(method: str, args: dict, precision: str, exact: bool) -> list[bool]:
    """For each decoder layer, whether its output is part of the autograd graph."""
    loaded = load_model("tiny-random-llama", seed=0)
    spec = get_method(method)
    model = spec.apply(loaded.model, spec.resolve_args(args), encoder_decoder=False)
    place_for_training(model, precision, torch.device("cpu"), exact=exact)
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.model.layers
    seen: dict[int, bool] = {}
    hooks = [layer.register_forward_hook(
        lambda _m, _i, out, k=k: seen.__setitem__(k, (out[0] if isinstance(out, tuple)
                                                      else out).grad_fn is not None))
        for k, layer in enumerate(layers)]
    try:
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")
        with autocast:
            loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    return [seen[k] for k in range(len(layers))]


@pytest.mark.parametrize(("precision", "exact"), [("fp32", True), ("fp32", False),
                                                  ("bf16", False)])
def test_lora_on_the_last_layer_only_builds_no_graph_below_it(precision, exact):
    graph = _layer_outputs_with_graph("lora", {"layers_to_transform": [1]}, precision, exact)
    assert graph == [False, True]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_partial_fine_tuning_of_the_last_layer_builds_no_graph_below_it(precision):
    graph = _layer_outputs_with_graph("partial", {"layers": "-1:"}, precision, False)
    assert graph == [False, True]


def test_a_trainable_first_layer_keeps_the_whole_graph():
    """The check above can fail: with the adapter on layer 0 both layers are in the graph."""
    graph = _layer_outputs_with_graph("lora", {"layers_to_transform": [0]}, "fp32", False)
    assert graph == [True, True]
