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
# power quantization (rust/core/src/quant): x/codes/scales/a/out addresses; CPU only for now
def quant_row_bytes(n: int, bits: int) -> int: ...
def quant_quantize(
    dtype_code: int, device_index: int, stream: int, bits: int, rows: int, n: int, group: int, clip: float,
    x: int, a: int, codes: int, scales: int,
) -> None: ...
def quant_dequantize(
    dtype_code: int, device_index: int, stream: int, bits: int, rows: int, n: int, group: int,
    codes: int, scales: int, a: int, out: int,
) -> None: ...
def quant_fake(
    dtype_code: int, device_index: int, stream: int, bits: int, rows: int, n: int, group: int, clip: float,
    x: int, a: int, y: int, scales: int,
) -> None: ...
def quant_fake_backward(
    dtype_code: int, device_index: int, stream: int, bits: int, rows: int, n: int, group: int,
    dy: int, x: int, scales: int, a: int, dx: int, da: int,
) -> None: ...
def quant_codebook(bits: int, rows: int, a: int, out: int) -> None: ...
def quant_linear(
    dtype_code: int, device_index: int, stream: int, bits: int, out_features: int, in_features: int, group: int,
    tokens: int, x: int, codes: int, scales: int, table: int, bias: int, y: int,
) -> None: ...
def quant_linear_backward(
    dtype_code: int, device_index: int, stream: int, bits: int, out_features: int, in_features: int, group: int,
    tokens: int, dy: int, codes: int, scales: int, table: int, dx: int,
) -> None: ...
def quant_search(
    bits: int, rows: int, n: int, group: int, clip: float, per_row: bool, z_rows: int, lo: float, grid: int,
    refine: int, w: int, z: int, out: int,
) -> None: ...
