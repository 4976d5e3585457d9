"""Engine start-up choices that are pure logic: the dtype that is fast on this CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.engine import platform


@pytest.mark.parametrize(
    ("requested", "cpu", "machine", "native_bf16", "expected"),
    [
        ("auto", True, "x86_64", True, "bfloat16"),  # AVX-512-BF16 or AMX: bf16 is fast
        ("auto", True, "x86_64", False, "float32"),  # emulated bf16 is ~4.5x slower than fp32
        ("auto", True, "aarch64", False, "auto"),  # other CPUs: vLLM's own rule
        ("auto", False, "x86_64", False, "auto"),  # GPU: vLLM's default
        ("bfloat16", True, "x86_64", False, "bfloat16"),  # a dtype the user names always wins
        ("float16", True, "x86_64", True, "float16"),
    ],
)
def test_dtype_auto_picks_the_fast_dtype_for_the_cpu(
    monkeypatch, requested, cpu, machine, native_bf16, expected
):
    monkeypatch.setattr("platform.machine", lambda: machine)
    monkeypatch.setattr(platform, "cpu_has_native_bf16", lambda: native_bf16)
    assert platform.resolve_dtype(requested, cpu) == expected


def test_native_bf16_follows_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split()
    assert platform.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
