"""The allocator's constructor arguments, validated once: every part is sized from them."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvshard._layout import INT32_MAX
from kvshard.allocator._common import MAX_TOKENS, is_int


@dataclasses.dataclass(frozen=True)
class AllocatorConfig:
    """Pool and table geometry of one :class:`kvshard.PageAllocator` (see its arguments)."""

    num_pages: int
    page_size: int
    max_requests: int
    max_pages_per_request: int
    enable_prefix_caching: bool = False
    sliding_window: int | None = None

    @classmethod
    def validated(
        cls,
        num_pages: Any,
        page_size: Any,
        max_requests: Any,
        max_pages_per_request: Any,
        enable_prefix_caching: Any,
        sliding_window: Any,
    ) -> AllocatorConfig:
        """Checks the arguments and returns them as Python ints.

        Raises:
            ValueError: naming the argument, its value and its bound.
        """
        for name, value, low in (
            ("num_pages", num_pages, 2),
            ("page_size", page_size, 1),
            ("max_requests", max_requests, 1),
            ("max_pages_per_request", max_pages_per_request, 1),
            ("sliding_window", 1 if sliding_window is None else sliding_window, 1),
        ):
            if not is_int(value) or value < low:
                raise ValueError(f"PageAllocator: {name}={value!r} must be an int >= {low}")
        for name, value in (("num_pages", num_pages), ("sliding_window", sliding_window)):
            if value is not None and value > INT32_MAX:
                raise ValueError(
                    f"PageAllocator: {name}={int(value)} must be <= 2**31 - 1 (it is int32 on "
                    "the device)"
                )
        tokens = int(max_pages_per_request) * int(page_size)
        if tokens > MAX_TOKENS:
            raise ValueError(
                f"PageAllocator: max_pages_per_request*page_size={tokens} must be <= 2**31 - 1 "
                "(a request's positions and kv_lens are int32 in build_step)"
            )
        if sliding_window is not None and enable_prefix_caching:
            raise ValueError(
                f"PageAllocator: sliding_window={sliding_window} cannot be combined with "
                "enable_prefix_caching=True (released pages would break cached prefixes)"
            )
        return cls(
            int(num_pages),
            int(page_size),
            int(max_requests),
            int(max_pages_per_request),
            bool(enable_prefix_caching),
            None if sliding_window is None else int(sliding_window),
        )

    @property
    def max_tokens(self) -> int:
        """Tokens one request may hold: ``max_pages_per_request * page_size``."""
        return self.max_pages_per_request * self.page_size

    def as_dict(self) -> dict[str, Any]:
        """The ``"config"`` entry of a state dict."""
        return dataclasses.asdict(self)
