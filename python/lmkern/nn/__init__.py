"""nn.Module wrappers of lmkern ops."""
from .norm import CRMSNorm, RMSNorm
from .quant import PowerQuantLinear, quantize_linears

__all__ = ["RMSNorm", "CRMSNorm", "PowerQuantLinear", "quantize_linears"]
