"""Tiny random built-in models and their locally built tokenizer (fast, offline)."""

from __future__ import annotations

import pytest
import torch

from peftbench.models import list_models, load_model, model_family, resolve_model_kind
from peftbench.models.tokenizer_tiny import build_tiny_tokenizer, tokenizer_digest

TINY = ["tiny-random-t5", "tiny-random-llama"]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_list_models_names_the_builtins() -> None:
    rows = {row["name"]: row for row in list_models()}
    assert set(rows) == {"smollm2-135m", "tiny-random-t5", "tiny-random-llama"}
    assert rows["smollm2-135m"]["pretrained"] is True
    assert rows["smollm2-135m"]["family"] == "decoder-only"
    assert rows["tiny-random-t5"]["family"] == "encoder-decoder"
    for name in TINY:
        assert rows[name]["pretrained"] is False
        assert "not pretrained" in rows[name]["source"]
    assert all(resolve_model_kind(name) == "builtin" for name in rows)


def test_tiny_t5_is_flan_shaped() -> None:
    loaded = load_model("tiny-random-t5")
    model, config = loaded.model, loaded.model.config
    assert loaded.is_encoder_decoder and not loaded.pretrained
    assert model_family(model) == "encoder-decoder"
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert (config.d_model, config.d_ff, config.num_layers, config.num_decoder_layers,
            config.num_heads, config.d_kv) == (64, 128, 2, 2, 4, 16)
    names = {name for name, _ in model.named_modules()}
    assert "encoder.block.0.layer.1.DenseReluDense.wi_0" in names
    assert "decoder.block.1.layer.2.DenseReluDense.wi_1" in names
    assert config.vocab_size == len(loaded.tokenizer)
    assert config.decoder_start_token_id == config.pad_token_id == 0
    assert next(model.parameters()).dtype == torch.float32


def test_tiny_llama_is_smollm2_shaped() -> None:
    loaded = load_model("tiny-random-llama")
    model, config = loaded.model, loaded.model.config
    assert not loaded.is_encoder_decoder and not loaded.pretrained
    assert model_family(model) == "decoder-only"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads) == (64, 128, 2, 4, 2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert config.vocab_size == len(loaded.tokenizer)


@pytest.mark.parametrize("name", TINY)
def test_same_seed_same_weights_other_seed_other_weights(name: str) -> None:
    state = torch.random.get_rng_state()
    a, b, c = (load_model(name, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state), "caller's RNG must be untouched"
    wa, wb, wc = _weights(a.model), _weights(b.model), _weights(c.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_fingerprints_differ_between_families() -> None:
    assert load_model("tiny-random-t5").fingerprint != load_model("tiny-random-llama").fingerprint


@pytest.mark.parametrize("flavour", ["t5", "llama"])
def test_tokenizer_round_trips_any_text(flavour: str) -> None:
    tok = build_tiny_tokenizer(flavour)
    for text in ["The capital of France is Paris.", "  two  spaces\tand\ttabs\n",
                 "Prices rose 3.5% (to $1,250) on 12/05/2025!", "Ünïcödé, 日本語, emoji 🙂"]:
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert 900 <= len(tok) <= 1100
    assert len(tok.tokenize("The capital of France is Paris.")) <= 10  # merges were learnt


def test_tokenizer_is_deterministic() -> None:
    assert tokenizer_digest(build_tiny_tokenizer("t5")) == tokenizer_digest(
        build_tiny_tokenizer("llama"))
    assert build_tiny_tokenizer("t5").get_vocab() == build_tiny_tokenizer("t5").get_vocab()


def test_special_tokens_t5() -> None:
    tok = load_model("tiny-random-t5").tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert tok.bos_token is None
    assert tok.padding_side == "right"
    ids = tok("hello world").input_ids
    assert tok.eos_token_id not in ids, "no automatic </s>: the trainer appends eos itself"


def test_special_tokens_llama() -> None:
    tok = load_model("tiny-random-llama").tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (
        0, 1, 2, 3)
    assert tok.padding_side == "right"
    ids = tok("hello world").input_ids
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    batch = tok(["a", "a longer text"], padding=True)
    assert batch.input_ids[0][-1] == tok.pad_token_id and batch.attention_mask[0][-1] == 0


def test_forward_with_labels_t5() -> None:
    loaded = load_model("tiny-random-t5")
    tok, model = loaded.tokenizer, loaded.model
    enc = tok(["Review: great film. Sentiment:", "Review: dull."], padding=True,
              return_tensors="pt")
    labels = torch.tensor([[51, tok.eos_token_id], [52, tok.eos_token_id]])
    out = model(**enc, labels=labels)
    assert out.logits.shape == (2, 2, len(tok))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    generated = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2


def test_forward_with_labels_llama() -> None:
    loaded = load_model("tiny-random-llama")
    tok, model = loaded.tokenizer, loaded.model
    enc = tok(["The capital of France is Paris.", "Hi."], padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    out = model(**enc, labels=labels)
    assert out.logits.shape[:2] == enc.input_ids.shape
    assert torch.isfinite(out.loss)
    out.loss.backward()
    prompt = tok(["Hello"], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 1 and generated.shape[1] <= prompt.input_ids.shape[1] + 3
