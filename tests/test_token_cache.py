"""Tokenised data cached on disk: same ids as tokenising text by text, served from the file
the second time, keyed by everything the ids depend on, robust to broken files."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from peftbench.config import RunSpec
from peftbench.models import load_model
from peftbench.training.encoding import IGNORE, Encoded, TextEncoder
from peftbench.training.runner import execute
from peftbench.training.token_cache import TokenCache, tokenizer_fingerprint

PAIRS = [("Review: a quiet, lovely film. Sentiment:", "positive"),
         ("Review: " + "long and winding " * 60 + "ending. Sentiment:", "negative"),
         ("name[The Eagle], food[French], area[riverside]", "The Eagle serves French food " * 20),
         ("", "x")]


def _encoder(model: str, folder: Path | None, max_source: int = 48) -> TextEncoder:
    loaded = load_model(model, seed=0)
    cache = TokenCache(folder, loaded.tokenizer) if folder is not None else None
    return TextEncoder(loaded.tokenizer, loaded.is_encoder_decoder, max_source, 16, cache)


def _text_by_text(model: str, max_source: int = 48, max_target: int = 16) -> list[Encoded]:
    """The encoding before the cache, written out: one tokenizer call per text."""
    loaded = load_model(model, seed=0)
    tok, enc_dec = loaded.tokenizer, loaded.is_encoder_decoder
    out = []
    for prompt, target in PAIRS:
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        if len(p) > max_source:
            p = p[: max_source - 16] + p[-16:]
        t = tok(target if enc_dec else " " + target, add_special_tokens=False)["input_ids"]
        t = [*t[: max_target - 1], tok.eos_token_id]
        out.append(Encoded(p, t) if enc_dec else Encoded(p + t, [IGNORE] * len(p) + t))
    return out


@pytest.mark.parametrize("model", ["tiny-random-llama", "tiny-random-t5"])
def test_cached_batched_ids_equal_text_by_text_ids(tmp_path, model):
    """Including truncated prompts and targets (the long pairs exceed both limits)."""
    one_by_one = _text_by_text(model)
    assert [_encoder(model, None).encode(p, t) for p, t in PAIRS] == one_by_one
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


def test_switches_outside_the_serialised_tokenizer_change_the_key():
    plain = load_model("tiny-random-llama", seed=0).tokenizer
    split = copy.deepcopy(plain)
    split.split_special_tokens = True  # "</s>" in a text is then split, not one token
    assert tokenizer_fingerprint(split) != tokenizer_fingerprint(plain)


def test_an_unwritable_cache_folder_still_tokenises(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    encoder = _encoder("tiny-random-llama", blocked / "tokens")
    assert encoder.encode_many(PAIRS) == _text_by_text("tiny-random-llama")

    def full_disk(self, _data):  # the temporary file exists, then the disk is full
        Path.touch(self)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    encoder = _encoder("tiny-random-llama", tmp_path / "full")
    assert encoder.encode_many(PAIRS) == _text_by_text("tiny-random-llama")
    assert not list((tmp_path / "full").iterdir())  # no temporary file left behind


def test_cache_files_are_as_readable_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        _encoder("tiny-random-llama", tmp_path).encode_many(PAIRS)
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.glob("*.safetensors")} == {0o644}


def test_a_run_with_an_unusable_cache_folder_completes(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("PEFTBENCH_CACHE", str(blocked / "cache"))
    spec = RunSpec(model="tiny-random-llama", task="toy_cls", method="bitfit", train_size=32,
                   max_steps=1, batch_size=16, max_eval_examples=16, device="cpu",
                   precision="fp32", seed=0)
    record = execute(spec, tmp_path / "run")
    assert record["status"] == "completed", record["error"]
    assert record["run"]["tokenization"]["texts_from_cache"] == 0


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
