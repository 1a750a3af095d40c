"""Generic loading: local save_pretrained directories and unknown names (fast, offline)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from peftbench.errors import UsageError
from peftbench.models import hub, load_model, resolve_model_kind
from peftbench.models.fingerprint import dir_fingerprint


@pytest.mark.parametrize(("name", "family"), [("tiny-random-t5", "encoder-decoder"),
                                              ("tiny-random-llama", "decoder-only")])
def test_load_saved_directory(tmp_path: Path, name: str, family: str) -> None:
    original = load_model(name, seed=3)
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)

    assert resolve_model_kind(str(tmp_path)) == "local"
    loaded = load_model(str(tmp_path))
    assert loaded.is_encoder_decoder == (family == "encoder-decoder")
    assert loaded.pretrained is True
    assert str(tmp_path.resolve()) in loaded.source
    assert type(loaded.model) is type(original.model)
    for key, value in original.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    text = "The capital of France is Paris. 123!"
    assert loaded.tokenizer(text).input_ids == original.tokenizer(text).input_ids
    assert loaded.tokenizer.pad_token_id == original.tokenizer.pad_token_id
    assert loaded.tokenizer.eos_token_id == original.tokenizer.eos_token_id
    assert loaded.tokenizer.padding_side == "right"
    assert len(loaded.fingerprint) == 64 and loaded.fingerprint == dir_fingerprint(tmp_path)


def test_directory_fingerprint_follows_the_weights(tmp_path: Path) -> None:
    for seed, folder in [(0, tmp_path / "a"), (0, tmp_path / "b"), (1, tmp_path / "c")]:
        load_model("tiny-random-llama", seed=seed).model.save_pretrained(folder)
    a, b, c = (dir_fingerprint(tmp_path / x) for x in "abc")
    assert a == b != c


def test_directory_without_config_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_missing_pad_token_becomes_eos(tmp_path: Path, caplog) -> None:
    original = load_model("tiny-random-llama")
    original.model.config.pad_token_id = None
    original.model.generation_config.pad_token_id = None
    original.tokenizer.pad_token = None
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id == 1
    assert loaded.model.config.pad_token_id == 1
    assert "no pad token" in caplog.text


def test_unknown_name_offline_fails_fast(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(UsageError) as info:
        load_model("xyz")
    assert time.perf_counter() - started < 5
    message = str(info.value)
    assert message.startswith(
        "unknown model 'xyz': not a built-in (smollm2-135m, tiny-random-t5, "
        "tiny-random-llama), not a local directory, and the Hugging Face Hub is "
        "unreachable or has no such model")
    assert "underlying error:" in message


def test_unknown_name_with_unreachable_hub_fails_fast(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    started = time.perf_counter()
    with pytest.raises(UsageError, match="Did you mean 'smollm2-135m'") as info:
        load_model("smollm2")
    assert time.perf_counter() - started < 5
    assert "unreachable" in str(info.value)


def test_missing_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a local directory"):
        load_model(str(tmp_path / "no" / "such" / "model"))


def test_hub_probe_answers_quickly() -> None:
    started = time.perf_counter()
    assert hub.hub_reachable("https://127.0.0.1:9", timeout=1.0) is False
    assert time.perf_counter() - started < 3


def offline_hub_cache(tmp_path: Path, monkeypatch, repo_id: str, revision: str) -> Path:
    """An empty Hugging Face cache in ``tmp_path`` whose ``main`` of ``repo_id`` is
    ``revision``, the Hub unreachable: the snapshot folder to fill."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    repo = tmp_path / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def test_hub_id_from_local_hf_cache_needs_no_network(tmp_path: Path, monkeypatch) -> None:
    revision = "a" * 40
    snapshot = offline_hub_cache(tmp_path, monkeypatch, "testorg/tiny-t5", revision)
    original = load_model("tiny-random-t5")
    original.model.save_pretrained(snapshot)
    original.tokenizer.save_pretrained(snapshot)

    started = time.perf_counter()
    loaded = load_model("testorg/tiny-t5")
    assert time.perf_counter() - started < 5, "must not wait on the unreachable Hub"
    assert loaded.is_encoder_decoder
    assert loaded.source == f"Hugging Face Hub (local cache): testorg/tiny-t5 (revision {revision})"
    assert loaded.model.config.name_or_path == "testorg/tiny-t5"
    assert loaded.fingerprint == dir_fingerprint(snapshot)


def test_check_model_needs_cached_weights_or_a_reachable_hub(tmp_path: Path,
                                                            monkeypatch) -> None:
    """The check before a sweep: a Hub id whose cache holds only config.json (what a
    check fetches) is not loadable offline."""
    from peftbench.models import check_model
    from peftbench.models.skeleton import skeleton

    snapshot = offline_hub_cache(tmp_path, monkeypatch, "testorg/tiny-llama", "b" * 40)
    original = load_model("tiny-random-llama")
    original.model.config.save_pretrained(snapshot)
    with pytest.raises(UsageError, match="the Hub is unreachable and it is not in the local"):
        check_model("testorg/tiny-llama")
    original.model.save_pretrained(snapshot)
    check_model("testorg/tiny-llama")
    model, encoder_decoder = skeleton("testorg/tiny-llama")  # weightless, from the cache
    assert not encoder_decoder and next(model.parameters()).device.type == "meta"
    assert [n for n, _ in model.named_parameters()] == \
        [n for n, _ in original.model.named_parameters()]


def test_a_local_model_is_one_run_however_its_path_is_spelled(tmp_path: Path,
                                                              monkeypatch) -> None:
    """Relative, absolute and linked spellings of one folder give one run hash (the store
    finds the run done); new weights saved into the folder give another."""
    from peftbench.config import RunSpec

    folder = tmp_path / "models" / "mine"
    load_model("tiny-random-llama", seed=3).model.save_pretrained(folder)
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path)

    def run_hash(model: str) -> str:
        return RunSpec(model=model, task="toy_cls", method="lora").run_hash()

    spelled = {run_hash(m) for m in ("models/mine", "./models/mine/", str(folder), "link")}
    assert len(spelled) == 1
    builtin = RunSpec(model="tiny-random-llama", task="toy_cls", method="lora")
    assert builtin.identity()["model"] == "tiny-random-llama"  # names stay as given
    load_model("tiny-random-llama", seed=4).model.save_pretrained(folder)
    assert run_hash("models/mine") not in spelled


def _saved_tiny_llama(folder: Path) -> Path:
    original = load_model("tiny-random-llama", seed=0)
    original.model.save_pretrained(folder)
    original.tokenizer.save_pretrained(folder)
    return folder


def test_routed_forwards_survive_train_and_eval_switches(tmp_path: Path) -> None:
    """Loaded models are off Hub kernels, so switching modes keeps the fused layers."""
    from peftbench.methods import get_method
    from peftbench.training.model_prep import place_for_training

    loaded = load_model(str(_saved_tiny_llama(tmp_path)))
    assert not getattr(loaded.model, "use_kernels", False)
    lora = get_method("lora")
    model = lora.apply(loaded.model, lora.resolve_args({}), encoder_decoder=False)
    applied = place_for_training(model, "bf16", torch.device("cpu"))
    norms = [m for m in model.modules() if hasattr(m, "_peftbench_fused_norm_forward")]
    assert len(norms) == applied["fused_rms_norm"] > 0
    for switch in (model.eval, model.train, model.eval, model.train):
        switch()
        assert all("forward" in vars(norm) for norm in norms)


def test_transformers_default_hub_kernels_would_undo_routed_forwards(tmp_path: Path) -> None:
    """Why loading turns them off: with ``kernels`` installed, transformers 5 loads with Hub
    kernels on and ``train()`` resets every forward set on a kernel-declared layer."""
    pytest.importorskip("kernels")
    from transformers import AutoModelForCausalLM

    from peftbench.models.setup import without_hub_kernels
    from peftbench.training.fused_rms_norm import fuse_rms_norms

    model = AutoModelForCausalLM.from_pretrained(_saved_tiny_llama(tmp_path))
    if not getattr(model, "use_kernels", False):
        pytest.skip("this transformers does not load with Hub kernels on")
    assert fuse_rms_norms(model) > 0
    model.eval()
    model.train()
    norms = [m for m in model.modules() if hasattr(m, "_peftbench_fused_norm_forward")]
    assert not any("forward" in vars(norm) for norm in norms)  # the hazard
    without_hub_kernels(model)
    for norm in norms:
        del norm._peftbench_fused_norm_forward
    fuse_rms_norms(model)
    model.eval()
    model.train()
    assert all("forward" in vars(norm) for norm in norms)
