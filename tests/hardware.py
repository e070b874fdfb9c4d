"""Facts about the test machine's CPU that change what onnxruntime computes."""
from __future__ import annotations

import platform
from pathlib import Path


def ort_int8_saturates() -> bool:
    """True on x86 CPUs without VNNI, where onnxruntime's int8 kernels saturate.

    MLAS multiplies uint8 activations by int8 weights with VPMADDUBSW on AVX2/AVX-512 CPUs that lack
    VNNI; that instruction adds pairs of products into int16 *with saturation*, so some dot products are
    clipped (Intel/OpenVINO document this "saturation issue"; VNNI CPUs and ARM are not affected). Measured
    on an AVX2 AMD EPYC: onnxruntime's vectors have mean cosine 0.990 to the exact int8 arithmetic (our
    numpy runtime, which matches the golden vectors to 5e-6) and to fp32 0.9907, vs 0.9924 for the numpy
    runtime. The board (ARM) does not saturate, so tests that use onnxruntime as an *exact* reference
    switch to the exact-int8 runtime on such CPUs, and say so.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    words = set(flags.split())
    return not ({"avx512_vnni", "avx_vnni", "avx_vnni_int8"} & words)
