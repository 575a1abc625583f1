"""What the CPU offers and what each engine reports it uses: CPU features, llama.cpp's system info, emulation."""

from __future__ import annotations

import os
import platform
from typing import Any

# Linux arm64 hwcaps (asm/hwcap.h) that decide which matmul kernels the engines pick.
_HWCAP = {"fp": 0, "asimd": 1, "atomics": 8, "fphp": 9, "asimdhp": 10, "asimddp": 20, "sve": 22, "asimdfhm": 23}
_HWCAP2 = {"sve2": 1, "svei8mm": 9, "i8mm": 13, "bf16": 14, "sme": 23}
_X86_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8")
ARM64 = ("aarch64", "arm64", "aarch64_be")


def cpu_features() -> list[str]:
    """The CPU features relevant to matmul kernels: arm64 hwcaps (getauxval), x86 flags (/proc/cpuinfo)."""
    machine = platform.machine().lower()
    if machine in ARM64:
        try:
            import ctypes

            getauxval = ctypes.CDLL(None).getauxval
            getauxval.restype = ctypes.c_ulong
            hw, hw2 = int(getauxval(16)), int(getauxval(26))  # AT_HWCAP, AT_HWCAP2
        except (OSError, AttributeError):
            return []
        return [n for n, b in _HWCAP.items() if hw >> b & 1] + [n for n, b in _HWCAP2.items() if hw2 >> b & 1]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in _X86_FLAGS if x in have]
    except OSError:
        pass
    return []


def emulation() -> str | None:
    """How this machine is emulated, when it is: $QWEN_EDGE_EMULATED (set by whoever runs it under an emulator,
    e.g. CI's qemu-user root), else an arm64 process whose /proc/cpuinfo describes an x86 CPU (qemu-user passes the
    host's through). None on a native machine."""
    said = os.environ.get("QWEN_EDGE_EMULATED", "").strip()
    if said:
        return said
    if platform.machine().lower() in ARM64:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read(65536)
        except OSError:
            return None
        if "GenuineIntel" in text or "AuthenticAMD" in text:
            return "arm64 on an x86 host (qemu-user)"
    return None


def onnxruntime_kernels(features: list[str] | None = None) -> dict[str, Any]:
    """onnxruntime's version and providers, and the MLAS kernel families its CPU dispatch picks from these
    features (MLAS reports none itself): int8-activation MatMulNBits (accuracy level 4) on arm64 runs SDOT kernels
    with dot-product, SMMLA with i8mm; fp16 vector arithmetic with asimdhp."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"available": False}
    f = set(cpu_features() if features is None else features)
    out: dict[str, Any] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    if platform.machine().lower() in ARM64:
        q8 = "i8mm (SMMLA)" if "i8mm" in f else "dot-product (SDOT)" if "asimddp" in f else "plain NEON"
        out["mlas"] = {"matmulnbits_int8_compute": q8, "fp16_arithmetic": "asimdhp" in f, "sve": "sve" in f}
    else:
        q8 = "AVX512-VNNI" if "avx512_vnni" in f else "AVX-VNNI" if "avx_vnni" in f else \
            "AVX2" if "avx2" in f else "SSE"
        out["mlas"] = {"matmulnbits_int8_compute": q8}
    return out


def llama_cpp_system_info() -> str | None:
    """llama.cpp's own report of the CPU features its kernels use (NEON, DOTPROD, REPACK, AVX2, ...), or None
    when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError):
        return None
    info = llama_cpp.llama_print_system_info()
    return (info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)).strip()


def report() -> dict[str, Any]:
    """Everything above, for bench's machine section and `.ci/arm64`'s log."""
    feats = cpu_features()
    return {"arch": platform.machine(), "emulated": emulation(), "cpu_features": feats,
            "onnxruntime": onnxruntime_kernels(feats), "llama_cpp": llama_cpp_system_info()}
