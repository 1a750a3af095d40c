"""Tokenised data cached on disk: same ids as tokenising text by text, served from the file
the second time, keyed by everything the ids depend on, robust to broken files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from peftbench.config import RunSpec
from peftbench.models import load_model
from peftbench.training.encoding import TextEncoder
from peftbench.training.runner import execute
from peftbench.training.token_cache import TokenCache

PAIRS = [("Review: a quiet, lovely film. Sentiment:", "positive"),
         ("Review: " + "long and winding " * 60 + "ending. Sentiment:", "negative"),
         ("name[The Eagle], food[French], area[riverside]", "The Eagle serves French food " * 20),
         ("", "x")]


def _encoder(model: str, folder: Path | None, max_source: int = 48) -> TextEncoder:
    loaded = load_model(model, seed=0)
    cache = TokenCache(folder, loaded.tokenizer) if folder is not None else None
    return TextEncoder(loaded.tokenizer, loaded.is_encoder_decoder, max_source, 16, cache)


@pytest.mark.parametrize("model", ["tiny-random-llama", "tiny-random-t5"])
def test_cached_batched_ids_equal_text_by_text_ids(tmp_path, model):
    """Including truncated prompts and targets (the long pairs exceed both limits)."""
    one_by_one = [_encoder(model, None).encode(p, t) for p, t in PAIRS]
    first = _encoder(model, tmp_path)
    assert first.encode_many(PAIRS) == one_by_one
    assert (first.cache.stats.cached, first.cache.stats.tokenised) == (0, 8)
    assert len(first.prompt_ids(PAIRS[1][0])) == 48  # truncation was exercised
    second = _encoder(model, tmp_path)
    assert second.encode_many(PAIRS) == one_by_one
    assert (second.cache.stats.cached, second.cache.stats.tokenised) == (8, 0)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # prompts and targets


def test_key_covers_tokenizer_settings_and_texts(tmp_path):
    _encoder("tiny-random-llama", tmp_path).encode_many(PAIRS)
    other = copy.deepcopy(_encoder("tiny-random-llama", None).tokenizer)
    other.add_tokens(["<extra>"])  # another tokenizer definition
    for encoder, pairs in ((TextEncoder(other, False, 48, 16, TokenCache(tmp_path, other)), PAIRS),
                           (_encoder("tiny-random-llama", tmp_path, max_source=40), PAIRS),
                           (_encoder("tiny-random-llama", tmp_path), PAIRS[:3])):
        encoder.prompt_ids_many([p for p, _ in pairs])
        assert encoder.cache.stats.cached == 0, encoder.cache.stats


def test_a_broken_file_is_recomputed_and_replaced(tmp_path):
    expected = _encoder("tiny-random-llama", None).prompt_ids_many([p for p, _ in PAIRS])
    _encoder("tiny-random-llama", tmp_path).prompt_ids_many([p for p, _ in PAIRS])
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    again = _encoder("tiny-random-llama", tmp_path)
    assert again.prompt_ids_many([p for p, _ in PAIRS]) == expected
    assert again.cache.stats.tokenised == len(PAIRS)
    third = _encoder("tiny-random-llama", tmp_path)
    assert third.prompt_ids_many([p for p, _ in PAIRS]) == expected
    assert third.cache.stats.cached == len(PAIRS)
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unwritable_cache_folder_still_tokenises(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    encoder = _encoder("tiny-random-llama", blocked / "tokens")
    assert encoder.encode_many(PAIRS) == _encoder("tiny-random-llama", None).encode_many(PAIRS)


def test_a_second_run_reads_its_tokens_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    spec = RunSpec(model="tiny-random-llama", task="toy_cls", method="bitfit", train_size=64,
                   max_steps=2, batch_size=16, max_eval_examples=16, device="cpu",
                   precision="fp32", seed=0)
    first = execute(spec, tmp_path / "a")
    second = execute(spec, tmp_path / "b")
    assert first["status"] == second["status"] == "completed"
    texts = 64 * 2 + 16 + 16  # training prompts and targets, validation and test prompts
    assert first["run"]["tokenization"]["texts_tokenised"] >= texts
    assert second["run"]["tokenization"]["texts_tokenised"] == 0
    tokenised, reused = (first["run"]["tokenization"][k]
                         for k in ("texts_tokenised", "texts_from_cache"))
    assert second["run"]["tokenization"]["texts_from_cache"] == tokenised + reused
    assert second["scores"] == first["scores"]
