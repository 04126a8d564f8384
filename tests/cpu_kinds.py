"""What the CPU running the tests can do, for tests whose expectations depend on it (bf16 in OpenVINO)."""

from __future__ import annotations

import os

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, oneDNN's "CPU Dispatcher Control") that still include bf16 dot products.
_BF16_CAPS = ("BF16", "AMX", "FP16", "AVX10", "ALL", "DEFAULT")


def openvino_bf16() -> tuple[str, str]:
    """How OpenVINO's CPU plugin answers a bf16 request here, and why: ("native", ""), ("f32", why) or
    ("broken", why).

    native: a CPU with AVX512_BF16 or AMX (the plugin lists "BF16" in OPTIMIZATION_CAPABILITIES) computes in bf16.
    f32: any other CPU; the plugin computes in f32 whatever the hint.
    broken: ONEDNN_MAX_CPU_ISA below bf16 caps the plugin's oneDNN while the plugin still reads bf16 from CPUID, so
    bf16 graphs with a Softmax fail to compile ("Supported primitive descriptors list is empty"; OpenVINO 2026.4,
    ONEDNN_MAX_CPU_ISA=AVX2 on an AMD EPYC). No real CPU is like that; f32 compiles and runs.
    """
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return "f32", "this CPU has no bf16 (no AMX or AVX512_BF16): OpenVINO computes in f32"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and not any(kind in cap for kind in _BF16_CAPS):
        return (
            "broken",
            f"ONEDNN_MAX_CPU_ISA={cap} hides bf16 from OpenVINO's oneDNN, not from its CPU plugin",
        )
    return "native", ""
