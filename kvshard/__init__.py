"""kvshard: a paged KV cache for LLM inference, sharded by KV head over a JAX device mesh."""

from importlib.metadata import PackageNotFoundError, version

from kvshard import kernels as kernels
from kvshard import reference as reference

try:
    __version__ = version("kvshard")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "kernels", "reference"]
