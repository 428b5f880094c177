"""Type stubs of lmkern._core, the PyO3 module over lmkern-core (private: use lmkern.ops).

Tensors are passed as raw addresses (Tensor.data_ptr(), 0 for None); the caller guarantees each
buffer holds the elements the sizes imply. dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16.
device: -1 for CPU, else the CUDA ordinal; stream: the raw CUstream (CUDA only).
"""

def cuda_status() -> str | None: ...
def set_num_threads(threads: int) -> None: ...
def get_num_threads() -> int: ...
def norm_dw_parts(rows: int, n: int) -> int: ...
def norm_forward(
    crms: bool, dtype_code: int, device_index: int, stream: int, rows: int, n: int,
    eps: float, offset: float, scale: float,
    x: int, residual: int, weight: int, y: int, h: int, rstd: int,
) -> None: ...
def norm_backward(
    crms: bool, dtype_code: int, device_index: int, stream: int, rows: int, n: int,
    offset: float, scale: float,
    dy: int, h: int, weight: int, rstd: int, dh_out: int, dx: int, dw_partial: int, dw: int, parts: int,
) -> None: ...
