"""A continuous-batching scheduler over :class:`~kvshard.PageAllocator`, independent of any
model.

* :class:`SchedulerConfig`: every policy in one validated object (token and sequence budgets,
  chunked prefill, decode first, preemption mode and victim order, step padding);
* :class:`GenerationRequest`: what a client asks for (prompt ids, max new tokens, stop ids,
  prefix-cache namespace, parallel samples ``n``);
* :class:`SchedulerOutput`: one step as the device needs it (:class:`~kvshard.StepMetadata`,
  packed input ids, swap and copy pairs in the order to apply them, rows to sample);
* :class:`FinishedRequest`: a request whose every sample finished;
* :class:`Scheduler`: admission, scheduling, preemption, forks and speculative rollback.
"""

from __future__ import annotations

from kvshard.scheduler._config import SchedulerConfig as SchedulerConfig
from kvshard.scheduler._output import SchedulerOutput as SchedulerOutput
from kvshard.scheduler._request import FinishedRequest as FinishedRequest
from kvshard.scheduler._request import GenerationRequest as GenerationRequest
from kvshard.scheduler._scheduler import Scheduler as Scheduler

__all__ = [
    "FinishedRequest",
    "GenerationRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
]
