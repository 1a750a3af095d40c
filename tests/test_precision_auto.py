"""``precision: auto``: bf16 only where the hardware computes it natively, recorded per run."""

from __future__ import annotations

import warnings

import pytest
import torch

from peftbench.analysis import analyse_records
from peftbench.config import RunSpec
from peftbench.errors import UsageError
from peftbench.report.tables import provenance
from peftbench.training import device as device_module
from peftbench.training.device import has_fast_bf16, resolve_precision, slow_bf16_warning
from peftbench.training.runner import execute

CPU = torch.device("cpu")


def _cpu_flags(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(("avx512_bf16", "amx", "fast"),
                         [(False, False, False), (True, False, True), (False, True, True)])
def test_cpu_bf16_is_fast_only_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, fast):
    _cpu_flags(monkeypatch, avx512_bf16, amx)
    assert has_fast_bf16(CPU) is fast
    assert resolve_precision("auto", CPU) == ("bf16" if fast else "fp32")


def test_explicit_precision_is_kept_and_a_bad_one_is_a_usage_error(monkeypatch):
    _cpu_flags(monkeypatch, False, False)
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(UsageError, match="use auto, bf16 or fp32"):
        resolve_precision("fp16", CPU)


def test_explicit_bf16_on_emulating_hardware_warns_and_auto_does_not(monkeypatch):
    _cpu_flags(monkeypatch, False, False)
    message = slow_bf16_warning("bf16", CPU)
    assert message and "no AVX-512 BF16 or AMX" in message and "--precision auto" in message
    assert slow_bf16_warning("auto", CPU) is None
    assert slow_bf16_warning("fp32", CPU) is None
    _cpu_flags(monkeypatch, True, False)
    assert slow_bf16_warning("bf16", CPU) is None


def test_auto_is_the_default_and_part_of_the_identity_unresolved(monkeypatch):
    """A run hash must not depend on the machine that computes it (like ``device``): the
    resolved precision is recorded in the result instead."""
    spec = RunSpec(model="tiny-random-llama", task="toy_cls", method="lora")
    assert spec.precision == "auto"
    _cpu_flags(monkeypatch, False, False)
    on_avx2 = spec.run_hash()
    _cpu_flags(monkeypatch, True, False)
    assert spec.run_hash() == on_avx2
    assert spec.model_copy(update={"precision": "bf16"}).run_hash() != on_avx2


@pytest.mark.parametrize(("fast", "expected"), [(False, "fp32"), (True, "bf16")])
def test_a_run_records_the_precision_it_computed_in(tmp_path, monkeypatch, fast, expected):
    monkeypatch.setattr(device_module, "has_fast_bf16", lambda _device: fast)
    spec = RunSpec(model="tiny-random-llama", task="toy_cls", method="lora", train_size=32,
                   max_steps=2, batch_size=8, eval_every=2, max_eval_examples=8, device="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="precision bf16", category=RuntimeWarning)
        record = execute(spec, tmp_path)  # auto never warns about emulated bf16
    assert record["status"] == "completed", record["error"]
    assert record["run"]["config"]["precision"] == "auto"
    assert record["run"]["precision"] == expected
    hardware_rows = provenance(analyse_records([record]))[-1].rows  # the report's table
    assert any(f"precision: {expected}" in row[0] for row in hardware_rows)
    assert "warnings" not in record["run"]


def test_a_run_in_explicit_bf16_on_emulating_hardware_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(device_module, "has_fast_bf16", lambda _device: False)
    spec = RunSpec(model="tiny-random-llama", task="toy_cls", method="bitfit", train_size=16,
                   max_steps=1, batch_size=8, eval_every=1, max_eval_examples=8, device="cpu",
                   precision="bf16")
    with pytest.warns(RuntimeWarning, match="bf16 matrix products are emulated"):
        record = execute(spec, tmp_path)
    assert record["status"] == "completed", record["error"]
    assert record["run"]["precision"] == "bf16"
    assert "emulated" in record["run"]["warnings"][0]


@pytest.mark.parametrize(("capability", "fast"), [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_bf16_is_fast_from_ampere_on_not_where_torch_emulates_it(monkeypatch, capability,
                                                                        fast):
    """``torch.cuda.is_bf16_supported()`` also says yes on a T4 or V100, which emulate bf16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device=None: capability)
    assert has_fast_bf16(torch.device("cuda")) is fast
