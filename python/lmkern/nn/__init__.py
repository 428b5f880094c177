"""nn.Module wrappers of lmkern ops."""
from .norm import CRMSNorm, RMSNorm
from .quant import PowerQuantLinear

__all__ = ["RMSNorm", "CRMSNorm", "PowerQuantLinear"]
