"""One scheduled step as the device needs it: :class:`SchedulerOutput`."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import numpy as np

from kvshard.step import StepMetadata


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """What :meth:`kvshard.Scheduler.schedule` returns for one step.

    Apply it on the device in this order (the allocator's documented order):
    ``swap_out(cache, host, swap_out_pairs)``, ``swap_in(cache, host, swap_in_pairs)``,
    ``copy_pages(cache, copy_pairs)``, then the forward with ``token_ids`` and ``step``.
    Then sample one token at each of ``sample_rows`` (the logits of that token index) for
    the sequence ``sample_seq_ids`` names, and hand them to :meth:`kvshard.Scheduler.update`.

    Attributes:
        step: the :class:`~kvshard.StepMetadata` of :func:`kvshard.build_step` (NumPy).
        token_ids: int32[num_tokens_padded] the step's input ids, packed in ``seq_ids``
            order like ``step``; padding tokens are 0.
        seq_ids: the B scheduled sequences, ``(req_id, sample index)``, in packing order.
        num_scheduled_tokens: int32[B] tokens each computes this step.
        swap_out_pairs: int32[K, 2] (device page, host page) to move to the host first.
        swap_in_pairs: int32[K, 2] (device page, host page) to bring back second.
        copy_pairs: int32[K, 2] copy-on-write (src, dst) pages, applied third.
        sample_rows: int32[S] token indices (into the step's token axis) to sample at.
        sample_seq_ids: the S sequences those samples belong to: a prompt's last token is
            sampled once per sample of an ``n > 1`` request (the same row, ``n`` ids), a
            sequence with draft tokens at each draft and after the last one.
        num_preempted: sequences preempted while scheduling this step.
    """

    step: StepMetadata
    token_ids: np.ndarray
    seq_ids: tuple[tuple[Hashable, int], ...]
    num_scheduled_tokens: np.ndarray
    swap_out_pairs: np.ndarray
    swap_in_pairs: np.ndarray
    copy_pairs: np.ndarray
    sample_rows: np.ndarray
    sample_seq_ids: tuple[tuple[Hashable, int], ...]
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens computed this step (padding excluded)."""
        return int(self.num_scheduled_tokens.sum())
