# Stop 24 (2026-11-28 00:35 UTC, AMD EPYC VM, 2 vCPUs, Python 3.11.7, torch 2.15.0). Before: ec63fc9; after: 755a21c.
# Output:
# before: dequantize [4194304, 1] 8-bit float32: 5765 ms
# before: dequantize [1048576, 8] 8-bit float32: 1445 ms
# before: dequantize [4194304, 1] 4-bit float32: 390 ms
# after:  dequantize [4194304, 1] 8-bit float32: 41 ms
# after:  dequantize [1048576, 8] 8-bit float32: 12 ms
# after:  dequantize [4194304, 1] 4-bit float32: 24 ms
# before: search_exponent [16, 2^22] 4-bit: 3.53 s, peak RSS +2.06 GiB
# after:  search_exponent [16, 2^22] 4-bit: 1.96 s, peak RSS +0.34 GiB
# before: power_quantize bf16 [1, 2^27] 4-bit, one group: 699 ms, peak RSS +1.19 GiB
# after:  power_quantize bf16 [1, 2^27] 4-bit, one group: 191 ms, peak RSS +0.19 GiB
# The script (python stop24_bench.py deq|searchmem|quantmem):
"""Stop 24 measurements: run once with the old build and once with the new (PYTHONPATH), in turn."""
import resource, subprocess, sys, time, json
import torch, lmkern
from lmkern import quant
torch.manual_seed(0)
case = sys.argv[1]
def best(f, reps=3):
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)
if case == "deq":
    for shape, bits in (((1 << 22, 1), 8), ((1 << 20, 8), 8), ((1 << 22, 1), 4)):
        x = torch.randn(shape)
        q = quant.power_quantize(x, torch.rand(shape[0]) * 0 + 0.6, bits)
        print(f"dequantize {list(shape)} {bits}-bit float32: {best(lambda: quant.power_dequantize(q)) * 1e3:.0f} ms")
elif case == "searchmem":
    w = torch.randn(16, 1 << 22)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter(); quant.search_exponent(w, 4); dt = time.perf_counter() - t
    print(f"search_exponent [16, 2^22] 4-bit: {dt:.2f} s, peak RSS +{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20:.2f} GiB")
elif case == "quantmem":
    x = torch.randn(1, 1 << 27, dtype=torch.bfloat16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter(); quant.power_quantize(x, 0.7, 4); dt = time.perf_counter() - t
    print(f"power_quantize bf16 [1, 2^27] 4-bit, one group: {dt*1e3:.0f} ms, peak RSS +{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20:.2f} GiB")
