"""The allocator's constructor arguments, validated once: every part is sized from them."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvshard._geometry.int32 import check_int32_int
from kvshard._geometry.layer_types import (
    FULL,
    CacheGroups,
    LayerType,
    cache_groups,
    check_layer_types,
    is_state,
    uniform_window,
)
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
    num_host_pages: int = 0
    host_prefix_pages: int = 0
    enable_kv_events: bool = False
    layer_types: tuple[LayerType, ...] | None = None
    group_page_sizes: tuple[int, ...] | None = None

    @classmethod
    def validated(
        cls,
        num_pages: Any,
        page_size: Any,
        max_requests: Any,
        max_pages_per_request: Any,
        enable_prefix_caching: Any,
        sliding_window: Any,
        num_host_pages: Any = 0,
        host_prefix_pages: Any = 0,
        enable_kv_events: Any = False,
        layer_types: Any = None,
        group_page_sizes: Any = None,
    ) -> AllocatorConfig:
        """Checks the arguments and returns them as Python ints.

        Raises:
            ValueError: naming the argument, its value and its bound.
        """
        device = "it is int32 on the device"
        for name, value, low, why in (
            ("num_pages", num_pages, 2, device),
            ("page_size", page_size, 1, ""),
            ("max_requests", max_requests, 1, ""),
            ("max_pages_per_request", max_pages_per_request, 1, ""),
            ("sliding_window", 1 if sliding_window is None else sliding_window, 1, device),
        ):
            check_int32_int("PageAllocator", name, value, low, why)
        tokens = int(max_pages_per_request) * int(page_size)
        if tokens > MAX_TOKENS:
            raise ValueError(
                f"PageAllocator: max_pages_per_request*page_size={tokens} must be <= 2**31 - 1 "
                "(a request's positions and kv_lens are int32 in build_step)"
            )
        types = _layer_types(layer_types, sliding_window)
        if types is not None and sliding_window is None:
            sliding_window = uniform_window(types)  # one ("sliding", W) group: as sliding_window
        if host_prefix_pages and (
            sliding_window is not None or (types is not None and set(types) != {FULL})
        ):
            raise ValueError(
                f"PageAllocator: host_prefix_pages={host_prefix_pages!r} needs full attention "
                "on every layer (the host prefix cache serves whole prefixes)"
            )
        sizes = _group_page_sizes(group_page_sizes, types, int(page_size))
        if host_prefix_pages and sizes is not None:
            raise ValueError(
                f"PageAllocator: host_prefix_pages={host_prefix_pages!r} needs one page size "
                f"(group_page_sizes={group_page_sizes!r} differ)"
            )
        host = (("num_host_pages", num_host_pages), ("host_prefix_pages", host_prefix_pages))
        for name, value in host:
            check_int32_int("PageAllocator", name, value, 0)
        if num_host_pages == 1:
            raise ValueError(
                "PageAllocator: num_host_pages=1 must be 0 (no host tier) or >= 2 (host page 0 "
                "is the host's null page)"
            )
        if host_prefix_pages and not enable_prefix_caching:
            raise ValueError(
                f"PageAllocator: host_prefix_pages={int(host_prefix_pages)} needs "
                "enable_prefix_caching=True"
            )
        if host_prefix_pages > max(int(num_host_pages) - 1, 0):
            raise ValueError(
                f"PageAllocator: host_prefix_pages={int(host_prefix_pages)} must be <= "
                f"num_host_pages - 1 = {max(int(num_host_pages) - 1, 0)} (usable host pages)"
            )
        return cls(
            int(num_pages),
            int(page_size),
            int(max_requests),
            int(max_pages_per_request),
            bool(enable_prefix_caching),
            None if sliding_window is None else int(sliding_window),
            int(num_host_pages),
            int(host_prefix_pages),
            bool(enable_kv_events),
            types,
            sizes,
        )

    @property
    def groups(self) -> CacheGroups | None:
        """The KV-cache groups of ``layer_types`` (None without layer types)."""
        return None if self.layer_types is None else cache_groups(self.layer_types)

    @property
    def group_types(self) -> tuple[LayerType, ...]:
        """The attention type of each KV-cache group (one group without layer types)."""
        groups = self.groups
        if groups is not None:
            return groups.group_types
        return (FULL,) if self.sliding_window is None else (("sliding", self.sliding_window),)

    @property
    def page_sizes(self) -> tuple[int, ...]:
        """Tokens per page of each KV-cache group (``page_size`` for every group without
        ``group_page_sizes``)."""
        if self.group_page_sizes is not None:
            return self.group_page_sizes
        return (self.page_size,) * len(self.group_types)

    @property
    def max_tokens(self) -> int:
        """Tokens one request may hold: ``max_pages_per_request * page_size``."""
        return self.max_pages_per_request * self.page_size

    def as_dict(self) -> dict[str, Any]:
        """The ``"config"`` entry of a state dict."""
        return dataclasses.asdict(self)


def _layer_types(layer_types: Any, sliding_window: Any) -> tuple[LayerType, ...] | None:
    """Validated ``layer_types`` (None stays None); refuses a ``sliding_window`` it contradicts.

    Raises:
        ValueError: a malformed entry (named), or ``sliding_window`` given with layer types
            that are not all ``("sliding", sliding_window)``.
    """
    if layer_types is None:
        return None
    if isinstance(layer_types, str) or not hasattr(layer_types, "__len__") or not layer_types:
        raise ValueError(
            f"PageAllocator: layer_types={layer_types!r} must be None or a non-empty sequence "
            "of layer types"
        )
    try:
        types = check_layer_types(layer_types, len(layer_types), allow_state=True)
    except ValueError as err:
        raise ValueError(f"PageAllocator: {err}") from None
    if all(is_state(t) for t in types):
        raise ValueError(
            f"PageAllocator: layer_types={layer_types!r:.80} has no attention layer; the "
            "allocator needs one (its page_size counts an attention group's tokens)"
        )
    if sliding_window is not None and uniform_window(types) != sliding_window:
        raise ValueError(
            f"PageAllocator: sliding_window={sliding_window!r} disagrees with layer_types (not "
            f"every layer is ('sliding', {sliding_window!r})); give the window in layer_types only"
        )
    return types


def _group_page_sizes(
    sizes: Any, types: tuple[LayerType, ...] | None, page_size: int
) -> tuple[int, ...] | None:
    """Validated ``group_page_sizes`` (None, or all equal to ``page_size``, gives None).

    Raises:
        ValueError: given without ``layer_types``, not one int per KV-cache group, or an
            entry that is not a positive multiple of ``page_size`` (a state group's must be
            ``page_size``).
    """
    if sizes is None:
        return None
    if types is None:
        raise ValueError(
            f"PageAllocator: group_page_sizes={sizes!r} needs layer_types (one size per group)"
        )
    group_types = cache_groups(types).group_types
    if isinstance(sizes, str) or not hasattr(sizes, "__len__") or len(sizes) != len(group_types):
        raise ValueError(
            f"PageAllocator: group_page_sizes={sizes!r} must list one page size per KV-cache "
            f"group ({len(group_types)}: {group_types})"
        )
    out = []
    for g, (size, t) in enumerate(zip(sizes, group_types, strict=True)):
        if not is_int(size) or size < 1 or size % page_size:
            raise ValueError(
                f"PageAllocator: group_page_sizes[{g}]={size!r} must be a positive multiple of "
                f"page_size={page_size} (page_size is the hash block: every group's pages "
                "are whole hash blocks)"
            )
        if is_state(t) and size != page_size:
            raise ValueError(
                f"PageAllocator: group_page_sizes[{g}]={size!r} is a state group's; it must be "
                f"page_size={page_size} (one state page per request, cached at page_size "
                "boundaries)"
            )
        out.append(int(size))
    return None if set(out) == {page_size} else tuple(out)
