"""asv suites of the norm family: lmkern.rms_norm / crms_norm side by side with their peers.

Each class times lmkern (time_lmkern, peakmem_lmkern) and its peer (time_<peer>, peakmem_<peer>) on
the same inputs, so asv reports both, and track_speedup reports peer time / lmkern time ("x")
measured interleaved in one process (asv has no ratio of its own). The ops, peers and inputs are
those of `lmkern bench` (lmkern.bench's registry), so both measure the same thing.

  asv machine --yes && asv run --python=same --quick --show-stderr

Parameters: device (cpu, and cuda where lmkern's CUDA path works), shape ("rows x n": 8192x4096 is
the target shape, 1x64 the per-call overhead case), dtype. On CUDA the timed functions synchronize.
"""
from __future__ import annotations

import torch

import lmkern
from lmkern import bench as lb

try:
    from asv_runner.benchmarks.mark import skip_for_params
except ImportError:  # asv_runner absent: the decorator only informs asv
    def skip_for_params(_params):
        return lambda f: f

DEVICES = ["cpu"] + (["cuda"] if lmkern.cuda_available() else [])
SHAPES = ["8192x4096", "1x64"]
DTYPES = ["float32", "bfloat16"]
# peakmem reads the process's peak host RSS: meaningless for CUDA tensors.
_NO_PEAKMEM = [(d, s, t) for d in DEVICES if d == "cuda" for s in SHAPES for t in DTYPES]


def _shape(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split("x"))


class _Norm:
    """Base: `entry` names a lmkern.bench registry entry; subclasses add time_/peakmem_ of the peer."""

    entry = ""
    params = [DEVICES, SHAPES, DTYPES]
    param_names = ["device", "shape", "dtype"]
    rounds = 1
    repeat = (3, 15, 20.0)
    warmup_time = 0.2
    timeout = 600

    def setup(self, device, shape, dtype):
        self.op = next(e for e in lb.REGISTRY if e.name == self.entry)
        dev = torch.device(device)
        gen = torch.Generator(device=dev).manual_seed(0)
        self.inputs = self.op.make(_shape(shape), getattr(torch, dtype), dev, gen)
        self.cuda = dev.type == "cuda"
        # Warm-up on two rows of the same width, dtype and device: the one-time costs of a process
        # (autograd engine, thread pools, first dispatch of each op: ~0.3 s for the first backward)
        # stay out of time_*, which --quick times with a single call, while peakmem_* still sees
        # only its own op at full size.
        small = self.op.make((2, _shape(shape)[-1]), getattr(torch, dtype), dev, gen)
        self.op.lmkern(small)
        self.op.peer(small)
        small["x"].detach().clone()
        self._sync()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _lmkern(self):
        self.op.lmkern(self.inputs)
        self._sync()

    def _peer(self):
        self.op.peer(self.inputs)
        self._sync()

    def time_lmkern(self, device, shape, dtype):
        self._lmkern()

    @skip_for_params(_NO_PEAKMEM)
    def peakmem_lmkern(self, device, shape, dtype):
        self._lmkern()

    def track_speedup(self, device, shape, dtype):
        """peer time / lmkern time, medians of interleaved rounds in this process."""
        t = lb.interleaved(
            {"lmkern": lambda: self.op.lmkern(self.inputs), "peer": lambda: self.op.peer(self.inputs)},
            device, min_rounds=5, budget_s=2.0, warmup=1,
        )
        return round(t["peer"].median / t["lmkern"].median, 3)

    track_speedup.unit = "x"


class RMSNormForward(_Norm):
    """lmkern.rms_norm vs torch.nn.functional.rms_norm, forward; x.clone() as the memory floor."""

    entry = "rms_norm fwd"

    def time_torch(self, device, shape, dtype):
        self._peer()

    @skip_for_params(_NO_PEAKMEM)
    def peakmem_torch(self, device, shape, dtype):
        self._peer()

    def time_clone(self, device, shape, dtype):
        self.inputs["x"].clone()
        self._sync()

    def track_vs_clone(self, device, shape, dtype):
        """x.clone() time / lmkern time: the forward's rate of bytes (read x, write y) relative to a
        copy of the same tensor (1.0 = as fast as a copy)."""
        x = self.inputs["x"]
        t = lb.interleaved(
            {"lmkern": lambda: self.op.lmkern(self.inputs), "clone": x.clone},
            device, min_rounds=5, budget_s=2.0, warmup=1,
        )
        return round(t["clone"].median / t["lmkern"].median, 3)

    track_vs_clone.unit = "x"


class RMSNormForwardBackward(_Norm):
    """Forward + backward (autograd.grad of x and weight): lmkern.rms_norm vs F.rms_norm."""

    entry = "rms_norm fwd+bwd"

    def time_torch(self, device, shape, dtype):
        self._peer()

    @skip_for_params(_NO_PEAKMEM)
    def peakmem_torch(self, device, shape, dtype):
        self._peer()


class RMSNormResidual(_Norm):
    """Fused residual: lmkern.rms_norm(x, w, residual=r) vs the composite h = x + r; F.rms_norm(h)."""

    entry = "rms_norm residual"

    def time_composite(self, device, shape, dtype):
        self._peer()

    @skip_for_params(_NO_PEAKMEM)
    def peakmem_composite(self, device, shape, dtype):
        self._peer()


class RMSNormResidualInPlace(_Norm):
    """In-place fused residual (inference): lmkern.rms_norm_(x, w, residual=r) writes h over r and y
    over x; the peer is torch's in-place composite r += x; F.rms_norm(r) (its y is a fresh tensor)."""

    entry = "rms_norm residual in place"

    def time_composite(self, device, shape, dtype):
        self._peer()

    @skip_for_params(_NO_PEAKMEM)
    def peakmem_composite(self, device, shape, dtype):
        self._peer()


class CRMSNormForward(_Norm):
    """lmkern.crms_norm vs a torch composite of the CRMS formula, forward."""

    entry = "crms_norm fwd"

    def time_composite(self, device, shape, dtype):
        self._peer()

    @skip_for_params(_NO_PEAKMEM)
    def peakmem_composite(self, device, shape, dtype):
        self._peer()


class CRMSNormForwardBackward(_Norm):
    """Forward + backward: lmkern.crms_norm vs the torch composite under autograd."""

    entry = "crms_norm fwd+bwd"

    def time_composite(self, device, shape, dtype):
        self._peer()

    @skip_for_params(_NO_PEAKMEM)
    def peakmem_composite(self, device, shape, dtype):
        self._peer()


class CRMSNormResidual(_Norm):
    """Fused residual: lmkern.crms_norm(x, w, residual=r) vs h = x + r; composite CRMSNorm of h."""

    entry = "crms_norm residual"

    def time_composite(self, device, shape, dtype):
        self._peer()

    @skip_for_params(_NO_PEAKMEM)
    def peakmem_composite(self, device, shape, dtype):
        self._peer()


class CRMSNormResidualInPlace(_Norm):
    """In-place fused residual: lmkern.crms_norm_(x, w, residual=r) vs r += x; composite CRMSNorm of r."""

    entry = "crms_norm residual in place"

    def time_composite(self, device, shape, dtype):
        self._peer()

    @skip_for_params(_NO_PEAKMEM)
    def peakmem_composite(self, device, shape, dtype):
        self._peer()
