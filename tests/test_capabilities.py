"""Device description, probes and speed-up policy (hf_cachehooks/training/capabilities.py).

GPUs as literals, CPU for real.
"""

from __future__ import annotations

import sys
import types
from dataclasses import replace

import pytest

from hf_cachehooks.training import capabilities
from hf_cachehooks.training.capabilities import Availability, Decision, decide, decisions_table, probe_availability
from hf_cachehooks.training.config import SpeedupConfig
from hf_cachehooks.training.devices import DEVICES, Device, detect_device

FULL = Availability(flash_attn=True, flash_attn_reason="flash_attn 2.8.3 (forward+backward ran)")
CPU_LIKE = Availability(
    flash_attn=False,
    flash_attn_reason="flash-attention needs a CUDA GPU (this is CPU)",
    compile=True,
    compile_reason="inductor with C++ compiler /usr/bin/g++",
    fused_adamw=True,
)
SETTINGS = [
    "precision",
    "tf32",
    "attn_implementation",
    "torch_compile",
    "optimizer",
    "dataloader_num_workers",
    "pad_to_multiple_of",
    "gradient_checkpointing",
]


def by_setting(decisions: list[Decision]) -> dict[str, Decision]:
    return {d.setting: d for d in decisions}


# (precision, tf32, attention, compile active) with FULL availability and SpeedupConfig(torch_compile=True)
EXPECTED_FULL = {
    "cpu": ("fp32", False, "sdpa", True),
    "v100": ("fp16", False, "sdpa", True),
    "t4": ("fp16", False, "sdpa", True),
    "a100": ("bf16", True, "flash_attention_2", True),
    "rtx3090": ("bf16", True, "flash_attention_2", True),
    "rtx4090": ("bf16", True, "flash_attention_2", True),
    "h100": ("bf16", True, "flash_attention_2", True),
    "rtx5090": ("bf16", True, "flash_attention_2", True),
    "rtx5090_old_torch": ("bf16", True, "sdpa", False),
}


def test_devices_cover_every_expected_case():
    assert set(DEVICES) == set(EXPECTED_FULL)


@pytest.mark.parametrize("name", sorted(EXPECTED_FULL))
def test_decide_with_full_availability(name):
    decisions = decide(SpeedupConfig(torch_compile=True), DEVICES[name], FULL)
    assert [d.setting for d in decisions] == SETTINGS
    got = by_setting(decisions)
    precision, tf32, attention, compiled = EXPECTED_FULL[name]
    assert got["precision"].chosen == precision
    assert got["tf32"].chosen is tf32 and got["tf32"].active is tf32
    assert got["attn_implementation"].chosen == attention
    assert got["attn_implementation"].active is (attention == "flash_attention_2")
    assert got["torch_compile"].active is compiled and got["torch_compile"].chosen is compiled
    assert got["optimizer"].chosen == "adamw_torch_fused" and got["optimizer"].active


@pytest.mark.parametrize("name", sorted(EXPECTED_FULL))
def test_decide_with_cpu_like_availability_never_picks_fa2(name):
    got = by_setting(decide(SpeedupConfig(), DEVICES[name], CPU_LIKE))
    assert got["attn_implementation"].chosen == "sdpa"
    assert not got["attn_implementation"].active
    assert got["attn_implementation"].reason  # says why
    assert got["precision"].chosen == EXPECTED_FULL[name][0]


def test_a100_gets_everything():
    got = by_setting(decide(SpeedupConfig(), DEVICES["a100"], FULL))
    assert (got["precision"].chosen, got["precision"].active) == ("bf16", True)
    assert got["tf32"].active and "under bf16 autocast" in got["tf32"].reason
    assert got["attn_implementation"].reason == FULL.flash_attn_reason
    assert got["torch_compile"].reason == "off" and not got["torch_compile"].active


def test_t4_is_turing_fp16_no_tf32_no_fa2():
    got = by_setting(decide(SpeedupConfig(), DEVICES["t4"], FULL))
    assert got["precision"].chosen == "fp16" and "8.0" in got["precision"].reason
    assert not got["tf32"].active and "Ampere" in got["tf32"].reason
    attention = got["attn_implementation"]
    assert attention.chosen == "sdpa" and "Ampere" in attention.reason and "Tesla T4" in attention.reason


def test_cpu_refuses_bf16_and_tf32_but_keeps_fused_adamw():
    got = by_setting(decide(SpeedupConfig(precision="bf16"), DEVICES["cpu"], CPU_LIKE))
    precision = got["precision"]
    assert (precision.requested, precision.chosen, precision.active) == ("bf16", "fp32", False)
    assert "CPU" in precision.reason and "use_cpu=True" in precision.reason
    assert got["tf32"].chosen is False and got["tf32"].reason == "TF32 needs an Ampere or newer GPU (this is CPU)"
    assert got["attn_implementation"].chosen == "sdpa" and "CUDA" in got["attn_implementation"].reason
    assert got["optimizer"].chosen == "adamw_torch_fused" and got["optimizer"].active


def test_explicit_bf16_on_turing_falls_back_to_fp16():
    precision = by_setting(decide(SpeedupConfig(precision="bf16"), DEVICES["t4"], FULL))["precision"]
    assert (precision.chosen, precision.active) == ("fp16", False)
    assert "Tesla T4 (sm_75)" in precision.reason and "fp16" in precision.reason


def test_explicit_fp16_on_cpu_falls_back_to_fp32_and_fp32_is_honoured():
    fp16 = by_setting(decide(SpeedupConfig(precision="fp16"), DEVICES["cpu"], CPU_LIKE))["precision"]
    assert (fp16.chosen, fp16.active) == ("fp32", False) and "CUDA" in fp16.reason
    fp32 = by_setting(decide(SpeedupConfig(precision="fp32"), DEVICES["a100"], FULL))["precision"]
    assert (fp32.chosen, fp32.active, fp32.reason) == ("fp32", True, "as requested")


def test_rtx5090_gets_bf16_and_fa2_when_flash_attn_runs():
    got = by_setting(decide(SpeedupConfig(torch_compile=True), DEVICES["rtx5090"], FULL))
    assert got["precision"].chosen == "bf16" and "warning" not in got["precision"].reason
    assert got["attn_implementation"].chosen == "flash_attention_2"
    assert got["torch_compile"].active


def test_rtx5090_with_old_torch_reports_missing_sm_120():
    device = DEVICES["rtx5090_old_torch"]
    assert device.sm == "sm_120" and not device.torch_supports_arch
    got = by_setting(decide(SpeedupConfig(torch_compile=True), device, FULL))
    assert not got["torch_compile"].active and "sm_120" in got["torch_compile"].reason
    assert "sm_120" in got["precision"].reason and "no kernel image" in got["precision"].reason
    assert got["attn_implementation"].chosen == "sdpa" and "sm_120" in got["attn_implementation"].reason


def test_rtx5090_with_old_triton_does_not_compile():
    device = replace(DEVICES["rtx5090"], triton_version="3.2.0")
    compiled = by_setting(decide(SpeedupConfig(torch_compile=True), device, FULL))["torch_compile"]
    assert not compiled.active and "3.3" in compiled.reason and "pip install -U triton" in compiled.reason


def test_compile_unavailable_passes_the_probe_reason():
    available = replace(FULL, compile=False, compile_reason="inductor on CPU needs a C++ compiler")
    compiled = by_setting(decide(SpeedupConfig(torch_compile=True), DEVICES["cpu"], available))["torch_compile"]
    assert (compiled.chosen, compiled.active, compiled.reason) == (False, False, available.compile_reason)


def test_fa2_unavailable_falls_back_to_sdpa_with_the_probe_reason():
    available = replace(FULL, flash_attn=False, flash_attn_reason="flash_attn 2.8.3 kernels fail: no kernel image")
    for requested in ("auto", "flash_attention_2"):
        attention = by_setting(decide(SpeedupConfig(attn_implementation=requested), DEVICES["h100"], available))[
            "attn_implementation"
        ]
        assert (attention.requested, attention.chosen, attention.active) == (requested, "sdpa", False)
        assert available.flash_attn_reason in attention.reason


def test_fa2_needs_half_precision():
    attention = by_setting(decide(SpeedupConfig(precision="fp32"), DEVICES["a100"], FULL))["attn_implementation"]
    assert attention.chosen == "sdpa" and "FA2 needs fp16/bf16; precision is fp32" in attention.reason


@pytest.mark.parametrize("requested", ["eager", "sdpa"])
def test_explicit_attention_is_honoured(requested):
    attention = by_setting(decide(SpeedupConfig(attn_implementation=requested), DEVICES["a100"], FULL))[
        "attn_implementation"
    ]
    assert (attention.chosen, attention.active) == (requested, True)


def test_sdpa_missing_means_eager():
    attention = by_setting(decide(SpeedupConfig(), DEVICES["cpu"], replace(CPU_LIKE, sdpa=False)))[
        "attn_implementation"
    ]
    assert attention.chosen == "eager"


def test_fused_adamw_unavailable_falls_back_with_reason():
    available = replace(FULL, fused_adamw=False, fused_reason="RuntimeError: fused kernels missing")
    optimizer = by_setting(decide(SpeedupConfig(), DEVICES["a100"], available))["optimizer"]
    assert (optimizer.chosen, optimizer.active) == ("adamw_torch", False)
    assert "fused kernels missing" in optimizer.reason
    other = by_setting(decide(SpeedupConfig(optimizer="adafactor"), DEVICES["a100"], available))["optimizer"]
    assert (other.chosen, other.active) == ("adafactor", True)


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 1), (4, 3), (5, 4), (16, 4), (0, 0)])
def test_num_workers_auto(cpus, workers):
    decision = by_setting(decide(SpeedupConfig(), replace(DEVICES["cpu"], cpu_count=cpus), CPU_LIKE))[
        "dataloader_num_workers"
    ]
    assert (decision.requested, decision.chosen, decision.active) == (None, workers, workers > 0)
    assert str(cpus) in decision.reason


def test_num_workers_as_requested():
    decision = by_setting(decide(SpeedupConfig(num_workers=7), DEVICES["cpu"], CPU_LIKE))["dataloader_num_workers"]
    assert (decision.chosen, decision.reason) == (7, "as requested")


@pytest.mark.parametrize(
    "config, device, available, pad",
    [
        (SpeedupConfig(pad_to_multiple_of=16), "cpu", CPU_LIKE, 16),
        (SpeedupConfig(torch_compile=True), "cpu", CPU_LIKE, 64),
        (SpeedupConfig(torch_compile=True), "a100", FULL, 64),
        (SpeedupConfig(), "a100", FULL, 8),
        (SpeedupConfig(torch_compile=True), "rtx5090_old_torch", FULL, 8),  # compile refused -> GPU rule
        (SpeedupConfig(), "cpu", CPU_LIKE, None),
    ],
)
def test_pad_to_multiple_of_rules(config, device, available, pad):
    decision = by_setting(decide(config, DEVICES[device], available))["pad_to_multiple_of"]
    assert (decision.chosen, decision.active) == (pad, pad is not None)
    if pad == 64:
        assert "recompile" in decision.reason


def test_gradient_checkpointing_and_tf32_off():
    got = by_setting(decide(SpeedupConfig(gradient_checkpointing=True, tf32=False), DEVICES["a100"], FULL))
    assert got["gradient_checkpointing"].active and "20%" in got["gradient_checkpointing"].reason
    assert (got["tf32"].chosen, got["tf32"].active, got["tf32"].reason) == (False, False, "off")
    assert not by_setting(decide(SpeedupConfig(), DEVICES["a100"], FULL))["gradient_checkpointing"].active


def test_device_properties():
    assert DEVICES["cpu"].sm is None and not DEVICES["cpu"].bf16_ok and not DEVICES["cpu"].fp16_ok
    assert DEVICES["cpu"].torch_supports_arch
    assert DEVICES["t4"].fp16_ok and not DEVICES["t4"].bf16_ok and not DEVICES["t4"].is_ampere_or_newer
    assert DEVICES["v100"].fp16_ok and DEVICES["v100"].sm == "sm_70"
    assert DEVICES["h100"].sm == "sm_90" and DEVICES["h100"].bf16_ok
    assert "sm_120" in DEVICES["rtx5090"].arch_list and DEVICES["rtx5090"].torch_supports_arch
    assert "sm_120" not in DEVICES["rtx5090_old_torch"].arch_list
    assert not Device("cuda", "old", (6, 1)).fp16_ok


@pytest.mark.parametrize(
    "arch_list, capability, supported",
    [
        ((), (12, 0), True),  # unknown: don't claim a problem
        (("sm_80", "sm_86", "sm_90"), (8, 9), True),  # sm_86 cubins run on sm_89
        (("sm_80", "sm_90"), (8, 6), True),
        (("sm_86", "sm_90"), (8, 0), False),  # a cubin never runs on an older minor
        (("sm_90a", "sm_100a"), (9, 0), True),
        (("sm_80", "sm_90", "sm_120"), (12, 1), True),  # GB10 / sm_121
        (("sm_80", "sm_90"), (12, 0), False),
        (("compute_90",), (12, 0), False),  # PTX only: torch itself warns it is incompatible
    ],
)
def test_torch_supports_arch(arch_list, capability, supported):
    assert Device("cuda", "gpu", capability, arch_list).torch_supports_arch is supported


def test_decisions_table_lists_every_setting_and_marks():
    decisions = decide(SpeedupConfig(precision="bf16"), DEVICES["cpu"], CPU_LIKE)
    table = decisions_table(decisions)
    lines = table.splitlines()
    assert [cell.strip() for cell in lines[0].split(" | ")] == ["setting", "requested", "chosen", "active", "reason"]
    assert len(lines) == 2 + len(SETTINGS)
    for setting, line in zip(SETTINGS, lines[2:]):
        assert line.startswith(setting)
    assert "✓" in table and "✗" in table
    assert "auto" in lines[SETTINGS.index("dataloader_num_workers") + 2]  # requested None shows as auto
    bars = {line.index("|") for line in lines if "|" in line}  # fixed width: the first column lines up
    assert len(bars) == 1


# --- the real probes, on this machine ---------------------------------------------------------------------------


def test_detect_device_on_this_machine():
    torch = pytest.importorskip("torch")
    device = detect_device()
    assert device.kind == ("cuda" if torch.cuda.is_available() else device.kind)
    assert device.torch_version == torch.__version__ and device.cpu_count >= 1
    if device.kind == "cpu":
        assert device.capability is None and device.sm is None and device.name


def test_probe_availability_on_cpu():
    device = detect_device()
    if device.kind != "cpu":
        pytest.skip("checks the CPU answers")
    available = probe_availability(device)
    assert not available.flash_attn and "CUDA" in available.flash_attn_reason
    assert available.fused_adamw, available.fused_reason  # CPU fused AdamW since torch 2.4
    assert available.compile and "C++ compiler" in available.compile_reason  # g++ is installed here
    assert available.sdpa


def test_flash_attn_import_error_is_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` now raises ImportError
    available = probe_availability(DEVICES["cpu"])
    assert not available.flash_attn
    assert "ModuleNotFoundError: import of flash_attn halted" in available.flash_attn_reason  # an ImportError


def test_flash_attn_broken_wheel_is_the_reason(monkeypatch, tmp_path):
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text("raise OSError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda')\n")
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    ok, reason = capabilities._probe_flash_attn(DEVICES["rtx5090"], smoke_test=True)
    assert not ok and "OSError" in reason and "undefined symbol" in reason


def _fake_flash_attn(func):
    module = types.ModuleType("flash_attn")
    module.__version__ = "2.8.3"  # type: ignore[attr-defined]
    module.flash_attn_func = func  # type: ignore[attr-defined]
    return module


def test_flash_attn_smoke_test_catches_kernel_failures(monkeypatch):
    pytest.importorskip("torch")

    def no_kernel(q, k, v, causal=False):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(no_kernel))
    ok, reason = capabilities._probe_flash_attn(DEVICES["rtx5090"], smoke_test=True, torch_device="cpu")
    assert not ok and "no kernel image" in reason and "2.8.3" in reason and "sm_120" in reason
    ok, reason = capabilities._probe_flash_attn(DEVICES["rtx5090"], smoke_test=False)
    assert ok and "not tested" in reason  # importable alone is reported as such


def test_flash_attn_smoke_test_passes_when_kernels_run(monkeypatch):
    pytest.importorskip("torch")
    calls = []

    def works(q, k, v, causal=False):
        calls.append(tuple(q.shape))
        return q * 1.0

    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(works))
    ok, reason = capabilities._probe_flash_attn(DEVICES["rtx5090"], smoke_test=True, torch_device="cpu")
    assert ok and "forward+backward" in reason and calls == [(1, 8, 2, 64)]
    ok, reason = capabilities._probe_flash_attn(DEVICES["cpu"], smoke_test=True)
    assert not ok and "CUDA" in reason and "2.8.3 installed" in reason


def test_fused_adamw_failure_is_the_reason(monkeypatch):
    torch = pytest.importorskip("torch")

    def broken(*args, **kwargs):
        raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")

    monkeypatch.setattr(torch.optim, "AdamW", broken)
    available = probe_availability(DEVICES["cpu"], smoke_test=False)
    assert not available.fused_adamw
    assert "RuntimeError" in available.fused_reason and "supported devices" in available.fused_reason
    optimizer = by_setting(decide(SpeedupConfig(), DEVICES["cpu"], available))["optimizer"]
    assert optimizer.chosen == "adamw_torch" and "supported devices" in optimizer.reason


def test_compile_without_a_cpp_compiler(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(capabilities.shutil, "which", lambda name: None)
    available = probe_availability(DEVICES["cpu"], smoke_test=False)
    assert not available.compile and "C++ compiler" in available.compile_reason


def test_compile_on_cuda_without_triton(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "triton", None)
    ok, reason = capabilities._probe_compile(DEVICES["rtx5090"])
    assert not ok and "Triton" in reason and "pip install -U triton" in reason


def test_compile_on_sm_120_needs_triton_3_3(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.2.0"))
    ok, reason = capabilities._probe_compile(DEVICES["rtx5090"])
    assert not ok and "3.2.0" in reason and "sm_120" in reason and "pip install -U triton" in reason
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.4.0"))
    assert capabilities._probe_compile(DEVICES["rtx5090"]) == (True, "inductor with Triton 3.4.0")
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.0.0"))
    assert capabilities._probe_compile(DEVICES["a100"])[0]  # only Blackwell needs the new Triton


def test_decide_is_pure_and_probes_import_torch_lazily():
    import subprocess

    code = (
        "import sys, hf_cachehooks.training.capabilities as c, hf_cachehooks.training.devices as d; "
        "c.decide(c.SpeedupConfig(), d.DEVICES['rtx5090'], c.Availability(True, 'x')); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.gpu
def test_probe_on_a_real_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = detect_device()
    available = probe_availability(device)
    assert device.kind == "cuda" and device.capability == tuple(torch.cuda.get_device_capability())
    assert device.torch_supports_arch
    assert available.fused_adamw, available.fused_reason
    assert available.flash_attn_reason
    decisions = by_setting(decide(SpeedupConfig(), device, available))
    if device.is_ampere_or_newer:
        assert decisions["precision"].chosen == "bf16" and decisions["tf32"].active
