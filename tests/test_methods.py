"""Methods: exact parameter counts, BitFit's zero-init biases, argument validation."""

from __future__ import annotations

import re

import pytest
import torch

from peftbench.errors import UsageError
from peftbench.methods import count_parameters, get_method, list_methods
from peftbench.models import load_model


def _llama_base_params(c) -> int:
    """Hand count of a tied-embedding Llama: embedding once, blocks, final norm."""
    h, inter, head_dim = c.hidden_size, c.intermediate_size, c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    block = h * h + 2 * h * kv + h * h + 3 * h * inter + 2 * h
    return c.vocab_size * h + c.num_hidden_layers * block + h


def _t5_base_params(c) -> int:
    """Hand count of a gated T5 (FLAN-style): shared embedding, untied lm_head."""
    d, inner, ff = c.d_model, c.num_heads * c.d_kv, c.d_ff
    attention = 4 * d * inner
    ffn = 3 * d * ff
    rel_bias = c.relative_attention_num_buckets * c.num_heads
    encoder = c.num_layers * (attention + ffn + 2 * d) + rel_bias + d
    decoder = c.num_decoder_layers * (2 * attention + ffn + 3 * d) + rel_bias + d
    lm_head = 0 if c.tie_word_embeddings else c.vocab_size * d
    return c.vocab_size * d + encoder + decoder + lm_head


def _apply(model_name: str, method: str, **args):
    loaded = load_model(model_name, seed=0)
    m = get_method(method)
    model = m.apply(loaded.model, m.resolve_args(args), encoder_decoder=loaded.is_encoder_decoder)
    return loaded, model


def test_llama_counts_match_hand_computed():
    loaded, _ = _apply("tiny-random-llama", "full")
    c = loaded.model.config
    base = _llama_base_params(c)
    h, inter = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    layers, r = c.num_hidden_layers, 8
    assert count_parameters(loaded.model) == (base, base)  # full: everything, tied counted once

    expected = {
        # all-linear: q, o (h -> h), k, v (h -> kv), gate, up (h -> inter), down (inter -> h)
        "lora": layers * r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + inter)),
        "ia3": layers * (kv + kv + inter),  # k, v (output side), down_proj (input side)
        "prompt_tuning": 20 * h,
        "bitfit": layers * (h + kv + kv + h + inter + inter + h),  # q k v o gate up down
    }
    for method, trainable in expected.items():
        _, model = _apply("tiny-random-llama", method)
        assert count_parameters(model) == (trainable, base + trainable), method
    _, model = _apply("tiny-random-llama", "lora", target_modules="q_proj,v_proj")  # the study's
    study = layers * (r * (h + h) + r * (h + kv))
    assert count_parameters(model) == (study, base + study)


def test_t5_counts_match_hand_computed():
    loaded, _ = _apply("tiny-random-t5", "full")
    c = loaded.model.config
    base = _t5_base_params(c)
    assert count_parameters(loaded.model) == (base, base)
    d, inner, ff, r = c.d_model, c.num_heads * c.d_kv, c.d_ff, 8
    attention_blocks = c.num_layers + 2 * c.num_decoder_layers  # self + cross in decoder
    ffn_blocks = c.num_layers + c.num_decoder_layers
    expected = {
        # all-linear: q k v o in every attention block, wi_0 wi_1 wo in every FFN
        "lora": attention_blocks * 4 * r * (d + inner) + ffn_blocks * 3 * r * (d + ff),
        "ia3": attention_blocks * 2 * inner + ffn_blocks * ff,  # k, v; wo (input side)
        "prompt_tuning": 20 * d,
        "bitfit": attention_blocks * (3 * inner + d) + ffn_blocks * (2 * ff + d),
    }
    for method, trainable in expected.items():
        _, model = _apply("tiny-random-t5", method)
        assert count_parameters(model) == (trainable, base + trainable), method


@pytest.mark.parametrize("model_name", ["tiny-random-llama", "tiny-random-t5"])
def test_bitfit_step0_outputs_identical_and_only_biases_train(model_name):
    base = load_model(model_name, seed=3)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    kwargs = {"input_ids": ids}
    if base.is_encoder_decoder:
        kwargs["decoder_input_ids"] = torch.tensor([[0, 11, 12]])
    with torch.no_grad():
        before = base.model(**kwargs).logits.clone()
    method = get_method("bitfit")
    model = method.apply(base.model, method.resolve_args({}),
                         encoder_decoder=base.is_encoder_decoder)
    with torch.no_grad():
        after = model(**kwargs).logits
    assert torch.equal(before, after)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("bias") for n in trainable)
    assert not any("lm_head" in n for n in trainable)


def test_method_args_are_validated():
    lora = get_method("lora")
    assert lora.resolve_args({"r": 4})["r"] == 4
    assert lora.resolve_args({"target_modules": "q_proj,k_proj"})["target_modules"] == [
        "q_proj", "k_proj"]
    with pytest.raises(UsageError, match=r"has no argument 'rank'.*r, target_modules"):
        lora.resolve_args({"rank": 4})
    with pytest.raises(UsageError, match="expected an integer"):
        lora.resolve_args({"r": "big"})
    with pytest.raises(UsageError, match="Did you mean 'lora'"):
        get_method("loar")


@pytest.mark.parametrize(("method", "args", "message"), [
    ("prompt_tuning", {"num_virtual_tokens": 0}, "num_virtual_tokens=0 .*must be at least 1"),
    ("prompt_tuning", {"init": "zeros"}, "choose one of sample_vocab, random"),
    ("lora", {"r": 0}, "r=0 .*must be at least 1"),
    ("lora", {"dropout": 1.5}, "must be from 0 to 1"),
    ("lora", {"alpha": -1}, "must be at least 0"),
])
def test_method_arguments_out_of_range_are_refused_before_a_run(method, args, message):
    """Caught when the run's config is resolved (a suite: before the sweep), not mid-run."""
    with pytest.raises(UsageError, match=message):
        get_method(method).resolve_args(args)
    assert get_method(method).resolve_args({k: None for k in args}) == \
        get_method(method).resolve_args({})  # None: the default


def test_none_is_the_default_and_other_odd_values_are_refused():
    lora = get_method("lora")
    assert lora.resolve_args({"r": None, "dropout": None}) == lora.resolve_args({})
    assert get_method("prompt_tuning").resolve_args({"init": None})["init"] == "sample_vocab"
    with pytest.raises(UsageError, match="expected a number"):
        lora.resolve_args({"dropout": float("nan")})
    for method, key in (("ia3", "target_modules"), ("partial", "modules")):
        with pytest.raises(UsageError, match="expected a name, a number or a list of them"):
            get_method(method).resolve_args({key: True})


def test_every_method_is_listed_with_a_default_lr():
    names = {m.name for m in list_methods()}
    assert names == {"full", "lora", "ia3", "prompt_tuning", "bitfit", "partial"}
    assert all(m.default_lr > 0 for m in list_methods())


def test_lora_target_that_matches_nothing_is_a_usage_error():
    loaded = load_model("tiny-random-llama", seed=0)
    lora = get_method("lora")
    with pytest.raises(UsageError, match="'nope' names no module of this model"):
        lora.apply(loaded.model, lora.resolve_args({"target_modules": ["nope"]}),
                   encoder_decoder=False)
    with pytest.raises(UsageError, match="peft rejected"):  # a pattern: peft's own check
        lora.apply(loaded.model, lora.resolve_args({"target_modules": ".*nope"}),
                   encoder_decoder=False)


@pytest.mark.parametrize(("method", "args", "message"), [
    ("prompt_tuning", {"num_virtual_tokens": 1100},
     r"num_virtual_tokens=1100 .*has 1024 positions.*the input share; use at most 1023"),
    ("bitfit", {"exclude": ["lm_head", "mlpp"]},
     r"exclude=\['lm_head', 'mlpp'\] .*'mlpp' names no module of this model.*down_proj"),
    ("bitfit", {"exclude": ["layers.7"]}, r"'layers.7' names no module"),
    ("ia3", {"feedforward_modules": ["gate_proj"]},
     r"'gate_proj' is not in the modules \(IA\)3 rescales by default in this model, "
     r"\['k_proj', 'v_proj', 'down_proj'\]"),
    ("ia3", {"target_modules": ["k_proj", "v_proj"], "feedforward_modules": ["down_proj"]},
     r"'down_proj' is not in target_modules.*e\.g\. target_modules=k_proj,v_proj,down_proj"),
])
def test_method_arguments_the_model_cannot_take_are_usage_errors(method, args, message):
    """Before: the soft prompt ran out of memory (exit 137, no message); the misspelled
    exclusion excluded nothing, silently; peft's subset error named no fix."""
    loaded = load_model("tiny-random-llama", seed=0)
    chosen = get_method(method)
    with pytest.raises(UsageError, match=message):
        chosen.apply(loaded.model, chosen.resolve_args(args), encoder_decoder=False)


def test_the_limits_leave_right_arguments_alone():
    _apply("tiny-random-llama", "prompt_tuning", num_virtual_tokens=1000)
    _, model = _apply("tiny-random-llama", "bitfit", exclude=["lm_head", "mlp"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and not any(".mlp." in n or "lm_head" in n for n in trained)
    _apply("tiny-random-t5", "prompt_tuning", num_virtual_tokens=600)  # relative positions
    _apply("tiny-random-llama", "ia3", feedforward_modules=["down_proj"])  # a default target


@pytest.mark.parametrize("exclude", [[0], ["layers.0"], ["model.layers.0"]])
def test_bitfit_excludes_a_layer_by_its_index_or_a_dotted_path(exclude):
    """An int from YAML, and a dotted path, once passed the check and excluded nothing."""
    _, model = _apply("tiny-random-llama", "bitfit", exclude=exclude)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and not any(".layers.0." in n for n in trained)
    assert any(".layers.1." in n for n in trained) and any("lm_head" in n for n in trained)


def test_the_soft_prompt_and_the_longest_sequence_must_fit_the_positions():
    loaded, _ = _apply("tiny-random-llama", "prompt_tuning", num_virtual_tokens=1000)
    tuning = get_method("prompt_tuning")
    args = tuning.resolve_args({"num_virtual_tokens": 1000})
    tuning.check_lengths(loaded.model, args, 24, encoder_decoder=False)  # 1024: fits
    with pytest.raises(UsageError, match=r"longest training sequence \(25 tokens\) share; "
                                         r"use at most 999 virtual tokens"):
        tuning.check_lengths(loaded.model, args, 25, encoder_decoder=False)


@pytest.mark.parametrize(("method", "args", "names"), [
    ("lora", {"target_modules": "q_proj,v_projj"}, "'v_projj'"),
    ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"],
             "feedforward_modules": ["down_projj"]}, "'down_projj'"),
    ("partial", {"modules": "self_attn,mlpp"}, "'mlpp'"),
])
def test_a_misspelled_module_beside_right_ones_is_a_usage_error(method, args, names):
    """peft and the partial selection only refused lists that matched nothing at all."""
    loaded = load_model("tiny-random-llama", seed=0)
    chosen = get_method(method)
    with pytest.raises(UsageError, match=f"{names} names no module of this model"):
        chosen.apply(loaded.model, chosen.resolve_args(args), encoder_decoder=False)


@pytest.mark.parametrize(("modules", "message"), [
    ("lm_head,q_proj", r"'lm_head' selects no parameter to train.*lm_head\.weight is "
                       r"model\.embed_tokens\.weight"),  # tied: selected by the other name
    ("act_fn,q_proj", "'act_fn' selects no parameter to train"),  # no weights of its own
])
def test_partial_modules_that_add_nothing_are_a_usage_error(modules, message):
    loaded = load_model("tiny-random-llama", seed=0)
    partial = get_method("partial")
    with pytest.raises(UsageError, match=message):
        partial.apply(loaded.model, partial.resolve_args({"modules": modules}),
                      encoder_decoder=False)


@pytest.mark.parametrize("model_name", ["tiny-random-llama", "tiny-random-t5"])
def test_all_linear_lora_on_chosen_layers_adapts_every_linear_of_those_layers_only(model_name):
    """peft refuses all-linear with layers_to_transform; peftbench names the linear layers."""
    _, everywhere = _apply(model_name, "lora")
    _, last = _apply(model_name, "lora", layers_to_transform="[1]")
    adapted = {n.split(".lora_A")[0] for n, _ in everywhere.named_parameters() if ".lora_A." in n}
    chosen = {n.split(".lora_A")[0] for n, _ in last.named_parameters() if ".lora_A." in n}
    expected = {n for n in adapted if re.search(r"\.(layers|block)\.1\.", n)}
    assert chosen == expected and 0 < len(chosen) < len(adapted)
    assert not any("lm_head" in n for n in adapted)


def test_lora_arguments_peft_does_not_combine_are_a_usage_error():
    loaded = load_model("tiny-random-llama", seed=0)
    lora = get_method("lora")
    args = lora.resolve_args({"target_modules": ".*q_proj", "layers_to_transform": "[1]"})
    with pytest.raises(UsageError, match="peft rejected the configuration"):
        lora.apply(loaded.model, args, encoder_decoder=False)


def test_layer_selections_are_parsed_and_checked():
    lora = get_method("lora")
    given_and_parsed = [(3, [3]), ("3", [3]), ([20, 21], [20, 21]), ("20,21", [20, 21]),
                        ("[20,21]", [20, 21]), ([-1], [-1]), ("-6:", "-6:"), ("[20:]", "20:"),
                        (" 0 : 4 ", "0:4"), (":-2", ":-2")]
    for given, parsed in given_and_parsed:
        assert lora.resolve_args({"layers_to_transform": given})["layers_to_transform"] == parsed
    for bad in ("last", "1,x", "1:2:3", "a:"):
        with pytest.raises(UsageError, match="expected layer indices"):
            lora.resolve_args({"layers_to_transform": bad})
    with pytest.raises(UsageError, match=r"a layer range such as -6:\) must be quoted"):
        lora.resolve_args({"layers_to_transform": {"-6": None}})  # YAML's reading of -6:


def test_layer_selections_resolve_against_the_layer_count():
    from peftbench.methods.layers import resolve_layers

    def resolve(selection, count=30):
        return resolve_layers(selection, count, "lora", "layers_to_transform")

    assert resolve("-6:") == [24, 25, 26, 27, 28, 29]
    assert resolve("0:3") == [0, 1, 2] and resolve(":-28") == [0, 1]
    assert resolve([-1, 0, 29]) == [0, 29]
    assert resolve(None) is None
    with pytest.raises(UsageError, match="selects none of the model's 30 layers"):
        resolve("20:10")
    assert resolve("-30:") == list(range(30)) and resolve("0:30") == list(range(30))
    for beyond in ("40:", "-31:", "20:31", ":-40"):  # clamped silently before
        with pytest.raises(UsageError, match="a range's ends go from -30 to 30"):
            resolve(beyond)
    with pytest.raises(UsageError, match="the model has 30 layers, indices 0 to 29"):
        resolve([30])
    with pytest.raises(UsageError, match="does not say how many layers"):
        resolve("-6:", count=None)
    assert resolve([3, 1], count=None) == [1, 3]


def test_lora_layer_outside_the_model_is_a_usage_error():
    loaded = load_model("tiny-random-llama", seed=0)  # 2 layers
    lora = get_method("lora")
    with pytest.raises(UsageError, match="the model has 2 layers, indices 0 to 1"):
        lora.apply(loaded.model, lora.resolve_args({"layers_to_transform": [1, 5]}),
                   encoder_decoder=False)


def test_lora_on_the_last_layers_by_range_adapts_those_layers():
    _, by_range = _apply("tiny-random-llama", "lora", layers_to_transform="-1:")
    _, by_index = _apply("tiny-random-llama", "lora", layers_to_transform=[1])
    names = {n for n, p in by_range.named_parameters() if p.requires_grad}
    assert names == {n for n, p in by_index.named_parameters() if p.requires_grad}
    assert names and all(".layers.1." in n for n in names)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_partial_trains_exactly_the_chosen_layers_and_modules():
    loaded, last = _apply("tiny-random-llama", "partial", layers="-1:")
    c = loaded.model.config
    h, inter = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    block = h * h + 2 * h * kv + h * h + 3 * h * inter + 2 * h  # attention, MLP, two norms
    assert count_parameters(last) == (block, _llama_base_params(c))
    assert all(n.startswith("model.layers.1.") for n in _trainable(last))

    _, attention = _apply("tiny-random-llama", "partial", modules="self_attn")
    assert count_parameters(attention)[0] == c.num_hidden_layers * (2 * h * h + 2 * h * kv)
    assert all(".self_attn." in n for n in _trainable(attention))

    _, both = _apply("tiny-random-llama", "partial", layers=[0], modules="q_proj,v_proj")
    assert _trainable(both) == {"model.layers.0.self_attn.q_proj.weight",
                                "model.layers.0.self_attn.v_proj.weight"}


def test_partial_on_t5_chooses_the_block_of_both_stacks_or_one_stack():
    _, last = _apply("tiny-random-t5", "partial", layers=[1])
    stacks = {n.split(".block.")[0] for n in _trainable(last)}
    assert stacks == {"encoder", "decoder"}
    assert all(".block.1." in n for n in _trainable(last))
    _, decoder = _apply("tiny-random-t5", "partial", modules="decoder")
    assert _trainable(decoder) and all(n.startswith("decoder.") for n in _trainable(decoder))


def test_partial_without_a_choice_or_choosing_nothing_is_a_usage_error():
    partial = get_method("partial")
    with pytest.raises(UsageError, match="to train every weight use method 'full'"):
        partial.resolve_args({})
    with pytest.raises(UsageError, match="expected module names"):
        partial.resolve_args({"modules": []})
    loaded = load_model("tiny-random-llama", seed=0)
    with pytest.raises(UsageError, match=r"'attention' names no module.*q_proj.*outside "
                                         r"them: model"):
        partial.apply(loaded.model, partial.resolve_args({"modules": "attention"}),
                      encoder_decoder=False)
    with pytest.raises(UsageError, match=r"select no parameter.*q_proj.*outside them: model"):
        partial.apply(loaded.model, partial.resolve_args({"layers": [0], "modules": "norm"}),
                      encoder_decoder=False)
    with pytest.raises(UsageError, match="the model has 2 layers"):
        partial.apply(loaded.model, partial.resolve_args({"layers": [2]}),
                      encoder_decoder=False)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
def test_all_linear_lora_on_chosen_layers_covers_conv1d_models():
    """GPT-2's projections are transformers' Conv1D, which peft's all-linear adapts too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64,
                                       n_positions=32))
    lora = get_method("lora")
    adapted = lora.apply(model, lora.resolve_args({"layers_to_transform": [1]}),
                         encoder_decoder=False)
    names = {n.split(".lora_A")[0].split(".h.")[1] for n, _ in adapted.named_parameters()
             if ".lora_A." in n}
    assert names == {"1.attn.c_attn", "1.attn.c_proj", "1.mlp.c_fc", "1.mlp.c_proj"}


def _t5_with_stacks(encoder: int, decoder: int):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=encoder,
        num_decoder_layers=decoder, feed_forward_proj="gated-gelu"))


def test_ranges_count_from_the_end_of_each_stack_of_an_encoder_decoder():
    partial = get_method("partial")
    model = partial.apply(_t5_with_stacks(4, 2), partial.resolve_args({"layers": "-1:"}),
                          encoder_decoder=True)
    blocks = {n.split(".layer.")[0] for n in _trainable(model)}
    assert blocks == {"encoder.block.3", "decoder.block.1"}
    # a range within the deeper stack covers all of a shallower one; beyond it: an error
    model = partial.apply(_t5_with_stacks(4, 2), partial.resolve_args({"layers": "-3:"}),
                          encoder_decoder=True)
    blocks = {n.split(".layer.")[0] for n in _trainable(model)}
    assert blocks == {"encoder.block.1", "encoder.block.2", "encoder.block.3",
                      "decoder.block.0", "decoder.block.1"}
    with pytest.raises(UsageError, match="the model has 4 layers; a range's ends go from -4"):
        partial.apply(_t5_with_stacks(4, 2), partial.resolve_args({"layers": "-5:"}),
                      encoder_decoder=True)
    lora = get_method("lora")
    with pytest.raises(UsageError, match=r"different depths .*encoder 4, decoder 2"):
        lora.apply(_t5_with_stacks(4, 2), lora.resolve_args({"layers_to_transform": "-1:"}),
                   encoder_decoder=True)
    # indices counted from 0 are fine for both
    adapted = lora.apply(_t5_with_stacks(4, 2), lora.resolve_args({"layers_to_transform": [1]}),
                         encoder_decoder=True)
    assert {n.split(".layer.")[0] for n in _trainable(adapted)} == {
        "base_model.model.encoder.block.1", "base_model.model.decoder.block.1"}


def test_partial_names_tied_weights_and_trains_gpt2_blocks():
    loaded = load_model("tiny-random-llama", seed=0)
    assert loaded.model.config.tie_word_embeddings
    partial = get_method("partial")
    with pytest.raises(UsageError, match=r"lm_head\.weight is model\.embed_tokens\.weight"):
        partial.apply(loaded.model, partial.resolve_args({"modules": "lm_head"}),
                      encoder_decoder=False)
    _, head = _apply("tiny-random-llama", "partial", modules="embed_tokens")
    assert _trainable(head) == {"model.embed_tokens.weight"}  # the one shared tensor

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=64,
                                      n_positions=32))
    partial = get_method("partial")
    model = partial.apply(gpt2, partial.resolve_args({"layers": "-1:", "modules": "attn"}),
                          encoder_decoder=False)
    assert _trainable(model) == {"transformer.h.2.attn.c_attn.weight",
                                 "transformer.h.2.attn.c_attn.bias",
                                 "transformer.h.2.attn.c_proj.weight",
                                 "transformer.h.2.attn.c_proj.bias"}


def test_one_plain_target_module_name_is_a_list_for_peft():
    """peft reads a string as a pattern for the whole dotted name: 'q_proj' matched nothing."""
    lora, ia3 = get_method("lora"), get_method("ia3")
    assert lora.resolve_args({"target_modules": "q_proj"})["target_modules"] == ["q_proj"]
    assert lora.resolve_args({})["target_modules"] == "all-linear"
    assert lora.resolve_args({"target_modules": ".*q_proj"})["target_modules"] == ".*q_proj"
    assert ia3.resolve_args({"feedforward_modules": "down_proj"})["feedforward_modules"] == [
        "down_proj"]
    _, model = _apply("tiny-random-llama", "lora", target_modules="q_proj")
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} == {
        "q_proj"}


def test_module_hint_lists_gpt2_conv1d_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64,
                                      n_positions=32))
    lora = get_method("lora")
    with pytest.raises(UsageError, match="its linear layers are called c_attn, c_fc, c_proj"):
        lora.apply(gpt2, lora.resolve_args({"target_modules": "q_proj"}), encoder_decoder=False)
