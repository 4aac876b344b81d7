"""ckptsurgery: PyTorch checkpoint surgery without running the checkpoint's code.

The library API: `open_checkpoint` reads any supported file into a lazy table of tensors;
`ckptsurgery.ops` holds the operations the commands run, one module each; `ckptsurgery.core`
the pure key logic they share."""

from .errors import CkptError

__version__ = "0.3.0"
__all__ = ["CkptError", "open_checkpoint", "__version__"]


def __getattr__(name: str):
    # the readers imported when the library is used, not by `import ckptsurgery` (`--version`,
    # the command line before it knows which command runs)
    if name == "open_checkpoint":
        from .io import open_checkpoint

        return open_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
