"""ckptsurgery: PyTorch checkpoint surgery without running the checkpoint's code.

The library API: `open_checkpoint` reads any supported file into a lazy table of tensors;
`ckptsurgery.ops` holds the operations the commands run, one module each; `ckptsurgery.core`
the pure key logic they share."""

from .errors import CkptError
from .io import open_checkpoint

__version__ = "0.3.0"
__all__ = ["CkptError", "open_checkpoint", "__version__"]
