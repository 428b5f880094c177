"""torch custom ops of lmkern, one module per kernel family. Importing registers them."""
from . import norm  # noqa: F401
from . import quant  # noqa: F401
