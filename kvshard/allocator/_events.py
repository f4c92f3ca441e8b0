"""KV-cache events: what entered and left the prefix cache, for KV-aware routers.

The same three events as vLLM's ``kv_events`` (``BlockStored``, ``BlockRemoved``,
``AllBlocksCleared``), with pages for blocks and the allocator's 16-byte chained page keys for
block hashes. ``medium`` says which tier holds the page: ``"device"`` or ``"host"`` (vLLM's
``medium``: ``"GPU"`` / ``"CPU"``). The queue is filled only with ``enable_kv_events=True``
(a queue nobody drains would grow without bound) and drained by
:meth:`kvshard.PageAllocator.take_kv_events`.

With several KV-cache groups (``PageAllocator(layer_types=...)``) each group caches its own
page of a block under the block's key: an event names the pages of one ``group`` (the index
into ``PageAllocator.group_types``), and its ``page_hashes`` keep vLLM's meaning, the chained
key of the block's prefix, which is the same in every group (vLLM likewise reports the block
hash without the group id).

Against vLLM's stream: ``PagesStored`` carries ``lora_id`` and ``medium`` as ``BlockStored``
does; ``PagesRemoved`` names a whole eviction's pages per group unless
``kv_events_per_page=True`` (then one event per page, as vLLM); and
:meth:`kvshard.PageAllocator.announce_prefix` re-announces the prefix a request reuses (vLLM's
``emit_cached_block_events``) and :meth:`kvshard.PageAllocator.announce_cached_pages` every page
cached now (for a router that connects late).
"""

from __future__ import annotations

import dataclasses

DEVICE = "device"
HOST = "host"


@dataclasses.dataclass(frozen=True)
class PagesStored:
    """Pages entered a tier's prefix cache (vLLM's ``BlockStored``).

    Attributes:
        page_hashes: the pages' keys, in prefix order (each chains the one before it).
        parent_hash: the key of the page before the first one, or None for a prompt's first
            page (or when unknown: a page moved between tiers, or after a load).
        token_ids: the tokens of those pages, or None where the allocator no longer has them
            (a page moved between tiers, or re-announced after ``load_state_dict``).
        page_size: tokens per page (of this group, with per-group page sizes).
        medium: ``"device"`` or ``"host"``.
        group: the KV-cache group whose pages these are (0 with one group).
        lora_id: the LoRA adapter the pages were computed with (vLLM's ``lora_id``), as
            given to :meth:`kvshard.PageAllocator.commit_prefix`; None for the base model or
            where unknown (a page moved between tiers, or re-announced).
    """

    page_hashes: tuple[bytes, ...]
    parent_hash: bytes | None
    token_ids: tuple[int, ...] | None
    page_size: int
    medium: str = DEVICE
    group: int = 0
    lora_id: int | None = None


@dataclasses.dataclass(frozen=True)
class PagesRemoved:
    """Pages left a tier's prefix cache (evicted, moved to the other tier, or reset;
    vLLM's ``BlockRemoved``); ``group`` as in :class:`PagesStored`.

    Granularity: by default one event names every page one eviction (or move) removed from
    one group, in eviction order; with ``PageAllocator(kv_events_per_page=True)`` each page
    gets its own event, as vLLM emits one ``BlockRemoved`` per block (a router that counts
    events, not hashes, then sees vLLM's stream). Both name the same hashes in the same order.
    """

    page_hashes: tuple[bytes, ...]
    medium: str = DEVICE
    group: int = 0


@dataclasses.dataclass(frozen=True)
class AllPagesCleared:
    """Every cached page of every tier was dropped (vLLM's ``AllBlocksCleared``)."""


KVEvent = PagesStored | PagesRemoved | AllPagesCleared


class EventQueue:
    """A list of events, appended to only when enabled."""

    def __init__(self, enabled: bool, page_size: int, per_page: bool = False) -> None:
        self.enabled = enabled
        self.page_size = page_size
        self.per_page = per_page  # one PagesRemoved per page (vLLM's granularity)
        self.events: list[KVEvent] = []

    def stored(
        self,
        keys: list[bytes],
        parent: bytes | None,
        tokens: tuple[int, ...] | None,
        medium: str = DEVICE,
        group: int = 0,
        lora_id: int | None = None,
        page_size: int | None = None,
    ) -> None:
        if self.enabled and keys:
            size = self.page_size if page_size is None else page_size
            self.events.append(
                PagesStored(tuple(keys), parent, tokens, size, medium, group, lora_id)
            )

    def removed(self, keys: list[bytes], medium: str = DEVICE, group: int = 0) -> None:
        if not (self.enabled and keys):
            return
        if self.per_page:
            self.events.extend(PagesRemoved((key,), medium, group) for key in keys)
        else:
            self.events.append(PagesRemoved(tuple(keys), medium, group))

    def cleared(self) -> None:
        if self.enabled:
            self.events.append(AllPagesCleared())

    def take(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events
