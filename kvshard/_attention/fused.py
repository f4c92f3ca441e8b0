"""``fused_attention``: write one layer's new K/V, then attend, in one call.

On ``backend="pallas"`` with kvshard's kernel (the default ``pallas_kernel``) it is ONE Pallas
kernel per layer and device (:func:`kvshard.kernels.attention.fused_ragged_paged_attention`):
the step's K/V rows, encoded as :func:`kvshard.update` encodes them, are merged into the
attention from VMEM (never fetched back from the pages) and written into their pages by DMA
after every read of the kernel, the cache aliased in place and donated like ``update``'s.
Elsewhere (xla, or JAX's pallas kernel) it is the composition :func:`kvshard.update` then
:func:`kvshard.attention`. Both give the same cache bit for bit and the same output, with the
same drop rule (:mod:`kvshard._device.drop`) and the same ``checks=True`` reports.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from kvshard._attention.api import FIELDS, ReadOptions, check_read, read, report_read
from kvshard._attention.pallas import local_kvshard
from kvshard._device.drop import route_layer
from kvshard._device.options import Backend, BackendOptions
from kvshard._device.sharding import to_spec
from kvshard.cache._codec import kv_in_spec, local_heads
from kvshard.cache._pytree import KVCache, with_kv
from kvshard.cache._update import WriteOptions, check_write, latent_kv, report_write, write
from kvshard.step import StepMetadata

__all__ = ["fused_attention"]


@functools.partial(
    jax.jit,
    static_argnames=("statics", "read", "checks_read", "checks_write"),
    donate_argnums=(0,),
)
def _fused(
    cache,
    layer,
    q,
    fields,
    sinks,
    k,
    v,
    slices,
    num_slices,
    *,
    statics,
    read,
    checks_read,
    checks_write,
):
    """The fused kernel under shard_map: (out, cache). The preamble is ``_read``'s and
    ``_write``'s (kvshard._attention.api, kvshard.cache._update): the layer routed to its
    group's page table and slices, the read layer -1 for a layer of another type."""
    spec, pa = cache.spec, cache.page_axis
    groups = spec.groups
    group, read_layer = route_layer(layer, groups.layer_group, groups.layer_slot, read.readable)
    _, write_layer = route_layer(layer, groups.layer_group, groups.layer_slot)
    fields = list(fields)
    if spec.num_groups > 1:
        fields[0] = jax.lax.dynamic_index_in_dim(
            fields[0], group, fields[0].ndim - 3, keepdims=False
        )
        slices = jax.lax.dynamic_index_in_dim(slices, group, slices.ndim - 3, keepdims=False)
    if pa is None:  # one pool: give every per-pool argument a group axis of size 1
        q, fields = q[None], [x[None] for x in fields]
        k, v, slices, num_slices = k[None], v[None], slices[None], num_slices[None]
    q_spec = P(pa, None, cache.head_axis, None)
    field_specs = [P(pa, *([None] * (np.ndim(x) - 1))) for x in fields]
    sink_specs = [] if sinks is None else [P(cache.head_axis)]
    kv_spec = kv_in_spec(cache)
    specs = [
        cache.pspec,
        P(),
        P(),
        q_spec,
        *sink_specs,
        *field_specs,
        kv_spec,
        kv_spec,
        P(pa, None, None),
        P(pa, None),
    ]
    inputs = [
        cache.kv,
        read_layer,
        write_layer,
        q,
        *([] if sinks is None else [sinks]),
        *fields,
        k,
        v,
        slices,
        num_slices,
    ]
    # Every device checks the whole metadata and raises alike (report_read, report_write).
    checked: list[Any] = []
    if checks_read:
        checked += [layer, *fields]
    if checks_write:
        checked += [layer, slices, num_slices]
    whole = [P(*([None] * np.ndim(x))) for x in checked]
    specs += whole
    inputs += checked
    args = [to_spec(cache.mesh, x, s) for x, s in zip(inputs, specs, strict=True)]

    def body(kv, read_layer, write_layer, q, *rest):
        sink, rest = (rest[:1], rest[1:]) if sinks is not None else ((), rest)
        fields, rest = rest[: len(FIELDS)], rest[len(FIELDS) :]
        k, v, sl, num, *whole = rest
        if checks_read:
            read_whole, whole = whole[: 1 + len(FIELDS)], whole[1 + len(FIELDS) :]
            report_read(spec, read, read_whole, num_tokens=q.shape[1])
        if checks_write:
            report_write(spec, whole, num_tokens=k.shape[1])
        k, v = local_heads(cache, k[0]), local_heads(cache, v[0])
        out, kv = local_kvshard(
            kv,
            read_layer,
            q[0],
            *(x[0] for x in fields),
            *sink,
            statics=statics,
            writes=(k, v, sl[0], num[0], write_layer),
        )
        return out[None], kv

    out, kv = jax.shard_map(
        body,
        mesh=cache.mesh,
        in_specs=tuple(specs),
        out_specs=(q_spec, cache.pspec),
        check_vma=False,  # pallas_call has no replication rule; the specs above are exact
    )(*args)
    return (out if pa is not None else out[0]), with_kv(cache, kv)


def fused_attention(
    cache: KVCache,
    layer: int | jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array | None,
    step: StepMetadata,
    *,
    backend: Backend = "auto",
    options: BackendOptions | None = None,
    checks: bool = False,
    **attention_kwargs: Any,
) -> tuple[jax.Array, KVCache]:
    """``update(cache, layer, k, v, step)`` then ``attention(cache, layer, q, step, ...)``.

    On ``backend="pallas"`` (kvshard's kernel) one Pallas kernel per device writes the step's
    tokens and attends, reading them from VMEM (:mod:`kvshard.kernels.attention`,
    ``fused_ragged_paged_attention``); elsewhere the two calls. It assumes the step's slices
    write each request's tokens at their own positions, as :func:`kvshard.build_step` builds
    them.

    Args:
      cache: DONATED when called eagerly, as by :func:`kvshard.update`; use the returned one.
      layer, step, backend, options, checks: as :func:`kvshard.update` and
        :func:`kvshard.attention` take them (the same drop rule and reports for both parts).
      q: the step's queries, as :func:`kvshard.attention` takes them.
      k, v: the step's new keys and values, as :func:`kvshard.update` takes them (a latent
        cache: the latent row as ``k``, ``v`` None; the composition, xla).
      **attention_kwargs: :func:`kvshard.attention`'s keywords (``sm_scale`` required;
        ``sliding_window``, ``layer_type``, ``soft_cap``, ``sinks``, ``q_scale``).

    Returns:
      (out, cache): attention's output and the updated cache, equal to the two calls'.

    Raises:
      Whatever :func:`kvshard.update` or :func:`kvshard.attention` raises for the same
      arguments, before anything is donated; ``step`` must be a
      :class:`~kvshard.StepMetadata` (TypeError otherwise).
    """
    if not isinstance(step, StepMetadata):
        raise TypeError(f"step must be a kvshard.StepMetadata, got {type(step).__name__}")
    read_kwargs = {
        "sm_scale": None,
        "sliding_window": None,
        "layer_type": None,
        "soft_cap": None,
        "sinks": None,
        "q_scale": None,
    }
    unknown = set(attention_kwargs) - set(read_kwargs)
    if unknown:
        raise TypeError(f"fused_attention got unexpected keyword arguments {sorted(unknown)}")
    if "sm_scale" not in attention_kwargs:
        raise TypeError("fused_attention needs sm_scale= (attention's softmax scale)")
    read_kwargs.update(attention_kwargs)
    # Both parts' host checks first: nothing is donated when one raises.
    to_write = check_write(
        cache,
        layer,
        *latent_kv(cache, k, v),
        step,
        None,
        WriteOptions(backend, options, checks, False),
    )
    to_read = check_read(
        cache,
        layer,
        q,
        step,
        ReadOptions(**read_kwargs, backend=backend, options=options, checks=checks),
    )
    fused = (
        to_read.layer_read.backend == "pallas"
        and to_write.static["backend"] == "pallas"
        and not to_read.statics.options.jax_attention_kernel
    )
    if not fused:  # the two jitted calls, checked once above
        cache = write(to_write)
        return read(to_read._replace(cache=cache)), cache
    return _fused(
        to_write.cache,
        to_read.layer,
        to_read.q,
        to_read.fields,
        to_read.sinks,
        to_write.k,
        to_write.v,
        to_write.slices,
        to_write.num_slices,
        statics=to_read.statics,
        read=to_read.read_type,
        checks_read=to_read.checks,
        checks_write=to_write.static["checks"],
    )
