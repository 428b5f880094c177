"""nn.Module wrappers of lmkern ops."""
from .norm import CRMSNorm, RMSNorm

__all__ = ["RMSNorm", "CRMSNorm"]
