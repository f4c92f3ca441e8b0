"""Capacity arithmetic for sliding-window models (pure functions; no allocator needed)."""

from __future__ import annotations

from kvshard._geometry.layer_types import check_positive_ints


def sliding_window_pages(sliding_window: int, page_size: int, max_new_tokens: int = 1) -> int:
    """Returns the most pages a request holds under ``PageAllocator(sliding_window=W)``.

    Right after an ``allocate`` that grows a request holding ``t`` tokens by ``n <=
    max_new_tokens`` tokens, it holds the pages overlapping tokens ``[max(t - W + 1, 0),
    t + n)``: at most ``W + n - 1`` consecutive tokens, which overlap at most
    ``(W + n - 1 + page_size - 2) // page_size + 1`` pages (the first one at a page's last
    slot). A planner divides the pool by this instead of ``ceil(context / page_size)`` for
    the capacity gain of a window (cap it at the latter for contexts shorter than the window).

    Args:
        sliding_window: W >= 1, the attention window in tokens (token ``p`` attends
            ``(p - W, p]``).
        page_size: tokens per page, >= 1.
        max_new_tokens: the most tokens one ``allocate`` adds to a request (1 for decode;
            the prefill chunk size with chunked prefill), >= 1.

    Returns:
        The page bound, an int >= 1; it is reached for some token count.

    Raises:
        ValueError: an argument is not an int >= 1.
    """
    check_positive_ints(
        "sliding_window_pages",
        sliding_window=sliding_window,
        page_size=page_size,
        max_new_tokens=max_new_tokens,
    )
    span = sliding_window + max_new_tokens - 1
    return (span + page_size - 2) // page_size + 1
