"""Per-request state of a hybrid's Mamba-2 layers, addressed by the allocator's state pages.

A Mamba-2 layer keeps, per request, a fixed-size state instead of per-token K/V: the conv
window (the last ``conv_kernel - 1`` conv inputs, ``[conv_dim, conv_kernel - 1]``) and the SSM
state (``[num_heads, head_dim, state_size]``). :class:`kvshard.PageAllocator` with the model's
:attr:`~kvshard.models.Architecture.cache_layer_types` puts the Mamba layers in state groups
of the shared pool (vLLM's equal-size groups, :func:`kvshard._geometry.layer_types.cache_groups`): a
request owns one page id per state group (``allocator.state_pages(rows)``), and a page id
names one state in each of the group's ``group_size`` cache layers, exactly as an attention
page id names token slots in each of its group's cache layers. The device arrays are laid out
so:

* ``conv``: dtype[G, group_size, num_pages, conv_dim, conv_kernel - 1];
* ``ssm``: ssm_dtype[G, group_size, num_pages, num_heads, head_dim, state_size];

G page pools (the mesh's data axis, like the KV cache's page axis). Mamba layer ``l`` of state
group ``s`` at cache layer ``j`` (:func:`state_layout`) reads and writes ``[:, j, page]`` with
``page`` its request's page in group ``s``; state groups draw distinct page ids from the one
pool, so they share these arrays. The SSM state is sharded by Mamba head over the
tensor-parallel axis (when the heads divide it); the conv window is replicated over it (its
channels mix the heads' x with the shared B and C). The model reads and writes them in place
inside the jitted step (the cache is donated): :class:`HybridCache` carries them with the
attention layers' :class:`kvshard.KVCache`. The state arrays are separate from the KV arrays
(the page ids are shared, the bytes are not aliased), so a page id reserves both a KV page and
a state page.

A token at position 0 starts from the zero state (a freshly allocated state page holds junk);
:func:`token_rows` gives each token's request row and that flag.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvshard._geometry.layer_types import cache_groups, is_state
from kvshard.models.config import Architecture

__all__ = [
    "HybridCache",
    "MambaState",
    "StateLayout",
    "StateSpec",
    "copy_state_pages",
    "init_state",
    "kv_step",
    "state_layout",
    "token_rows",
]


class StateLayout(NamedTuple):
    """Where a hybrid's layers live in the shared pool (from vLLM's grouping of
    :attr:`~kvshard.models.Architecture.cache_layer_types`).

    Attributes:
      num_kv_groups: the attention groups (they come first; the KV cache has exactly these).
      num_state_groups: the state groups (one state page per request each).
      group_size: cache layers per group (the state arrays' second axis).
      mamba: for each model layer, (state group, cache layer) of a Mamba layer, else None.
    """

    num_kv_groups: int
    num_state_groups: int
    group_size: int
    mamba: tuple[tuple[int, int] | None, ...]


def state_layout(arch: Architecture) -> StateLayout:
    groups = cache_groups(arch.cache_layer_types)
    kv = sum(not is_state(t) for t in groups.group_types)
    mamba = tuple(
        (groups.layer_group[i] - kv, groups.layer_slot[i]) if layer.mixer == "mamba" else None
        for i, layer in enumerate(arch.layers)
    )
    return StateLayout(kv, groups.num_groups - kv, groups.group_size, mamba)


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Shapes of the Mamba state arrays: ``group_size`` cache layers of ``num_pages`` pages
    (the pool's, null page included), and one Mamba layer's conv and SSM dimensions."""

    group_size: int
    num_pages: int
    conv_dim: int
    conv_kernel: int
    num_heads: int
    head_dim: int
    state_size: int
    conv_dtype: str
    ssm_dtype: str

    @classmethod
    def from_arch(cls, arch: Architecture, num_pages: int) -> StateSpec:
        spec = arch.mamba
        if spec is None:
            raise ValueError(f"{arch.model_type} has no Mamba layers")
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages} must be >= 2 (the null page and one more)")
        return cls(
            group_size=state_layout(arch).group_size,
            num_pages=num_pages,
            conv_dim=spec.conv_dim,
            conv_kernel=spec.conv_kernel,
            num_heads=spec.num_heads,
            head_dim=spec.head_dim,
            state_size=spec.state_size,
            conv_dtype=arch.dtype,
            ssm_dtype=spec.ssm_dtype,
        )

    @property
    def bytes_per_layer(self) -> int:
        """One request's state in one Mamba layer: conv window plus SSM state."""
        conv = self.conv_dim * (self.conv_kernel - 1) * jnp.dtype(self.conv_dtype).itemsize
        ssm = self.num_heads * self.head_dim * self.state_size
        return conv + ssm * jnp.dtype(self.ssm_dtype).itemsize

    @property
    def bytes_per_page(self) -> int:
        """One state page: one state in each of the group's cache layers."""
        return self.group_size * self.bytes_per_layer


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["conv", "ssm"], meta_fields=["shardings"]
)
@dataclasses.dataclass(frozen=True)
class MambaState:
    """conv dtype[G, L, num_pages, conv_dim, K - 1] and ssm [G, L, num_pages, H, P, N], and
    their shardings (static): :meth:`replace` keeps every update in them, so the jitted step's
    outputs alias its donated inputs (written in place, never resharded into a copy)."""

    conv: Any
    ssm: Any
    shardings: tuple[Any, Any] | None = None

    def replace(self, conv: Any, ssm: Any) -> MambaState:
        if self.shardings is not None:
            conv = jax.lax.with_sharding_constraint(conv, self.shardings[0])
            ssm = jax.lax.with_sharding_constraint(ssm, self.shardings[1])
        return MambaState(conv, ssm, self.shardings)


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
    lead = (pools, spec.group_size, spec.num_pages)
    shardings = (
        NamedSharding(mesh, P(page_axis, None, None, None, None)),
        NamedSharding(mesh, P(page_axis, None, None, heads, None, None)),
    )
    conv = jax.device_put(
        jnp.zeros((*lead, spec.conv_dim, spec.conv_kernel - 1), spec.conv_dtype), shardings[0]
    )
    ssm = jax.device_put(
        jnp.zeros((*lead, spec.num_heads, spec.head_dim, spec.state_size), spec.ssm_dtype),
        shardings[1],
    )
    return MambaState(conv, ssm, shardings)


@jax.jit
def copy_state_pages(state: MambaState, pairs) -> MambaState:
    """The allocator's copy-on-write of state pages: pairs int32[G, K, 2] (src, dst) per pool;
    every copy reads the state from before the call (rows with src == dst are no-ops, usable
    as padding; the other rows' destinations must be distinct). Every cache layer is copied
    (a page id belongs to one group; the other layers' entries at it are unused)."""

    def one(array, src, dst):  # array [L, num_pages, ...] of one pool
        return array.at[:, dst].set(array[:, src])

    src, dst = pairs[..., 0], pairs[..., 1]
    return state.replace(*(jax.vmap(one)(a, src, dst) for a in (state.conv, state.ssm)))


def kv_step(step: Any, num_kv_groups: int) -> Any:
    """A (stacked) step of an allocator with state groups, cut to its attention groups: what
    :func:`kvshard.update` and :func:`kvshard.attention` of the attention layers' KV cache
    take (its groups are the allocator's attention groups, which come first)."""
    geometry = step.geometry
    if geometry is None or geometry.num_groups == num_kv_groups:
        return step
    stacked = np.ndim(step.positions) == 2  # [dp, T]
    axis = 1 if stacked else 0

    def cut(a):
        a = np.take(a, np.arange(num_kv_groups), axis=axis)
        return np.squeeze(a, axis) if num_kv_groups == 1 else a

    return dataclasses.replace(
        step,
        slices=cut(step.slices),
        page_indices=cut(step.page_indices),
        geometry=geometry._replace(num_groups=num_kv_groups),
    )


def token_rows(step: Any) -> tuple[Any, Any, Any]:
    """(row int32[..., T], fresh bool[..., T], valid bool[..., T]) of a (stacked) step: each
    token's request row (from ``cu_q_lens``), whether it is its request's position 0 (it
    starts from the zero state), whether it is a real token (not padding)."""
    cu, num_seqs, positions = step.cu_q_lens, step.num_seqs, step.positions
    T = positions.shape[-1]
    t = jnp.arange(T, dtype=jnp.int32)
    live = jnp.arange(cu.shape[-1] - 1) < num_seqs[..., :1]  # [..., R]: rows past num_seqs
    ended = (t[:, None] >= cu[..., None, 1:]) & live[..., None, :]  # [..., T, R]
    row = jnp.sum(ended, axis=-1).astype(jnp.int32)
    valid = row < num_seqs[..., :1]
    return row, (positions == 0) & valid, valid
