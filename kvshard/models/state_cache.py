"""Per-request state of a hybrid's Mamba-2 layers, beside the KV cache of its attention layers.

A Mamba-2 layer keeps, per request, a fixed-size state instead of per-token K/V: the conv
window (the last ``conv_kernel - 1`` conv inputs, ``[conv_dim, conv_kernel - 1]`` in the model
dtype) and the SSM state (``float32[num_heads, head_dim, state_size]``). They live in two
device arrays indexed by a state slot, one slot per running request per pool:

* ``conv``: dtype[G, L, S, conv_dim, conv_kernel - 1];
* ``ssm``: float32[G, L, S, num_heads, head_dim, state_size];

G page pools (the mesh's data axis, like the KV cache's page axis), L Mamba layers, S slots.
The SSM state is sharded by Mamba head over the tensor-parallel axis (when the heads divide
it); the conv window is replicated over it (its channels mix heads with the shared B and C).
The model reads and writes them in place inside the jitted step (the cache is donated):
:class:`HybridCache` carries them with the attention layers' :class:`kvshard.Cache`.

Which slot holds a request's state is the host's: :class:`StateSlots` hands them out per
pool (a request keeps its slot from its first token to :meth:`StateSlots.free`); the step
passes ``slots`` int32[G, R], the slot of each of its R request rows, and
:func:`token_rows` maps every token to its row. A token at position 0 starts from the zero
state, so a reused slot needs no clearing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvshard.models.config import Architecture

__all__ = ["HybridCache", "MambaState", "StateSlots", "StateSpec", "init_state", "token_rows"]


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Shapes of the Mamba state arrays: ``num_layers`` Mamba layers, ``num_slots`` slots per
    pool, and one Mamba layer's conv and SSM dimensions."""

    num_layers: int
    num_slots: int
    conv_dim: int
    conv_kernel: int
    num_heads: int
    head_dim: int
    state_size: int
    dtype: str

    @classmethod
    def from_arch(cls, arch: Architecture, num_slots: int) -> StateSpec:
        spec = arch.mamba
        if spec is None:
            raise ValueError(f"{arch.model_type} has no Mamba layers")
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        return cls(
            num_layers=len(arch.mamba_layers),
            num_slots=num_slots,
            conv_dim=spec.conv_dim,
            conv_kernel=spec.conv_kernel,
            num_heads=spec.num_heads,
            head_dim=spec.head_dim,
            state_size=spec.state_size,
            dtype=arch.dtype,
        )

    @property
    def bytes_per_layer(self) -> int:
        """One request's state in one Mamba layer: conv window plus float32 SSM state."""
        conv = self.conv_dim * (self.conv_kernel - 1) * np.dtype(jnp.dtype(self.dtype)).itemsize
        return conv + self.num_heads * self.head_dim * self.state_size * 4

    @property
    def bytes_per_request(self) -> int:
        """One request's state over every Mamba layer (independent of its length)."""
        return self.num_layers * self.bytes_per_layer


class MambaState(NamedTuple):
    """conv dtype[G, L, S, conv_dim, K - 1] and ssm float32[G, L, S, H, P, N]."""

    conv: Any
    ssm: Any


class HybridCache(NamedTuple):
    """A hybrid model's cache: the attention layers' KV cache and the Mamba layers' state."""

    kv: Any
    state: MambaState


def init_state(
    spec: StateSpec, mesh: Mesh, *, head_axis: str = "model", page_axis: str = "data"
) -> MambaState:
    """Zeroed state arrays, one set per pool of ``mesh.shape[page_axis]``, placed as the module
    docstring says."""
    pools, tp = int(mesh.shape[page_axis]), int(mesh.shape[head_axis])
    heads = head_axis if spec.num_heads % tp == 0 else None
    conv_shape = (pools, spec.num_layers, spec.num_slots, spec.conv_dim, spec.conv_kernel - 1)
    ssm_shape = (
        pools,
        spec.num_layers,
        spec.num_slots,
        spec.num_heads,
        spec.head_dim,
        spec.state_size,
    )
    conv = jax.device_put(
        jnp.zeros(conv_shape, spec.dtype), NamedSharding(mesh, P(page_axis, None, None, None, None))
    )
    ssm = jax.device_put(
        jnp.zeros(ssm_shape, jnp.float32),
        NamedSharding(mesh, P(page_axis, None, None, heads, None, None)),
    )
    return MambaState(conv, ssm)


def token_rows(step: Any) -> tuple[Any, Any, Any]:
    """(row int32[..., T], fresh bool[..., T], valid bool[..., T]) of a (stacked) step: each
    token's request row (from ``cu_q_lens``), whether it is its request's position 0, whether
    it is a real token (not padding)."""
    cu, num_seqs, positions = step.cu_q_lens, step.num_seqs, step.positions
    T = positions.shape[-1]
    t = jnp.arange(T, dtype=jnp.int32)
    live = jnp.arange(cu.shape[-1] - 1) < num_seqs[..., :1]  # [..., R]: rows past num_seqs
    ended = (t[:, None] >= cu[..., None, 1:]) & live[..., None, :]  # [..., T, R]
    row = jnp.sum(ended, axis=-1).astype(jnp.int32)
    valid = row < num_seqs[..., :1]
    return row, (positions == 0) & valid, valid


class StateSlots:
    """Hands out one state slot per running request in one pool (host side).

    ``slot(req_id)`` gives the request its slot on first use (the lowest free one) and the
    same one until ``free(req_id)``; ``rows(req_ids, R)`` is the int32[R] slot of each of a
    step's request rows (0 past ``len(req_ids)``: padding rows write nothing).
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots))
        self._of: dict[Hashable, int] = {}

    def slot(self, req_id: Hashable) -> int:
        if req_id not in self._of:
            if not self._free:
                raise ValueError(
                    f"request {req_id!r}: all {self.num_slots} state slots are in use "
                    f"(num_slots={self.num_slots})"
                )
            self._of[req_id] = self._free.pop(0)
        return self._of[req_id]

    def free(self, req_id: Hashable) -> None:
        self._free.append(self._of.pop(req_id))
        self._free.sort()

    def rows(self, req_ids: Sequence[Hashable], num_rows: int) -> np.ndarray:
        out = np.zeros(num_rows, np.int32)
        out[: len(req_ids)] = [self.slot(r) for r in req_ids]
        return out
