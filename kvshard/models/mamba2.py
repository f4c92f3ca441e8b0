"""The Mamba-2 mixer of a hybrid decoder (Bamba), dense and served from per-request state.

The math is transformers' ``BambaMixer`` (its torch path): ``in_proj`` splits into a gate, the
conv input ``xBC`` and ``dt``; a depthwise causal conv over ``xBC`` (SiLU); the selective
state-space scan (SSD) with ``dt = clamp(softplus(dt + dt_bias), time_step_limit)``,
``A = -exp(A_log)`` and the ``D`` skip; a gated RMSNorm per group (``y * silu(gate)``,
normalised over each of ``num_groups`` slices); ``out_proj``.

Two forms of the scan, checked against each other (and a float64 recurrence) in the tests:

* :func:`ssd_chunked`: whole sequences, in chunks of ``chunk_size`` (transformers'
  ``mamba2_chunk_scan``, from an initial state, returning the final one): the dense path;
* :func:`ssd_step`: one token from the state: the recurrence the paged path runs token by
  token (:func:`scan_tokens`), so a request's state carries exactly across prefill chunks
  and decodes.

Paged, each Mamba layer reads and writes its state in place in the state cache
(:mod:`kvshard.models.state_cache`): token t of the step belongs to request row r (from
``step.cu_q_lens``), whose state sits in state page ``pages[r]``; a token at position 0
starts from the zero state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kvshard.models.config import Architecture, MambaSpec

__all__ = ["GatedRMSNorm", "Mamba2Mixer", "causal_conv", "scan_tokens", "ssd_chunked", "ssd_step"]


def _segsum(x):
    """x [..., L] -> [..., L, L]: out[i, j] = sum(x[j+1 .. i]) for j <= i, -inf above."""
    L = x.shape[-1]
    tril = jnp.tril(jnp.ones((L, L), bool), -1)
    expanded = jnp.where(tril, jnp.broadcast_to(x[..., :, None], (*x.shape, L)), 0.0)
    summed = jnp.cumsum(expanded, axis=-2)
    return jnp.where(jnp.tril(jnp.ones((L, L), bool)), summed, -jnp.inf)


def _discretize(dt, dt_bias, spec: MambaSpec):
    low, high = spec.time_step_limit
    return jnp.clip(jax.nn.softplus(dt + dt_bias), low, high)


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None):
    """The SSD scan of whole sequences in chunks (transformers' ``mamba2_chunk_scan``).

    x float32[b, T, H, P]; dt float32[b, T, H] (discretized); A float32[H]; B, C
    float32[b, T, H, N] (groups already repeated per head); initial_state float32[b, H, P, N]
    or None (zeros). Returns (y float32[b, T, H, P] without the D skip, final state
    float32[b, H, P, N]).
    """
    b, T, H, P = x.shape
    pad = (-T) % chunk_size

    def chunks(t):
        t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        return t.reshape(b, -1, chunk_size, *t.shape[2:])

    x = x * dt[..., None]
    a = A * dt  # [b, T, H]
    x, a, B, C = chunks(x), chunks(a), chunks(B), chunks(C)  # [b, c, l, ...]
    a = jnp.moveaxis(a, -1, 1)  # [b, H, c, l]
    a_cum = jnp.cumsum(a, axis=-1)
    L = jnp.exp(_segsum(a))  # [b, H, c, l, s]
    scores = jnp.einsum("bclhn,bcshn->bclsh", C, B)
    y_diag = jnp.einsum("bclsh,bcshp->bclhp", scores * jnp.moveaxis(L, 1, -1), x)
    decay = jnp.exp(a_cum[..., -1:] - a_cum)  # [b, H, c, l]
    states = jnp.einsum("bclhn,bhcl,bclhp->bchpn", B, decay, x)
    if initial_state is None:
        initial_state = jnp.zeros((b, H, P, B.shape[-1]), jnp.float32)
    states = jnp.concatenate([initial_state[:, None].astype(jnp.float32), states], axis=1)
    chunk_decay = jnp.exp(_segsum(jnp.pad(a_cum[..., -1], [(0, 0), (0, 0), (1, 0)])))
    new_states = jnp.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final = new_states[:, :-1], new_states[:, -1]
    y_off = jnp.einsum("bclhn,bchpn,bhcl->bclhp", C, states, jnp.exp(a_cum))
    y = (y_diag + y_off).reshape(b, -1, H, P)[:, :T]
    return y, final


def ssd_step(state, x, dt, A, B, C):
    """One token of the scan: state float32[H, P, N], x float32[H, P], dt float32[H]
    (discretized), A float32[H], B, C float32[H, N] -> (y float32[H, P] without the D skip,
    the new state)."""
    state = state * jnp.exp(dt * A)[:, None, None] + (dt[:, None] * x)[..., None] * B[:, None]
    return jnp.einsum("hpn,hn->hp", state, C), state


def causal_conv(xbc, weight, bias, window=None):
    """Depthwise causal conv of whole sequences: xbc [b, T, C], weight [C, K], bias [C] or
    None; ``window`` [b, C, K - 1] the K - 1 inputs before token 0 (None: zeros). Returns
    (out [b, T, C] before the activation, accumulated in float32 and cast to xbc's dtype as
    PyTorch's conv1d does, the last K - 1 inputs [b, C, K - 1])."""
    K = weight.shape[-1]
    if window is None:
        window = jnp.zeros((xbc.shape[0], xbc.shape[2], K - 1), xbc.dtype)
    padded = jnp.concatenate([jnp.swapaxes(window, 1, 2).astype(xbc.dtype), xbc], axis=1)
    T = xbc.shape[1]
    f32 = padded.astype(jnp.float32)
    out = sum(f32[:, k : k + T] * weight[:, k].astype(jnp.float32) for k in range(K))
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(xbc.dtype), jnp.swapaxes(padded[:, T:], 1, 2)


class GatedRMSNorm(nnx.Module):
    """transformers' ``BambaRMSNormGated``: (y * silu(gate)) normalised over each of
    ``groups`` equal slices, in float32, cast back to y's dtype (the scan's float32), times
    the weight."""

    def __init__(self, dim: int, groups: int, arch: Architecture, rngs: nnx.Rngs):
        noise = 0.1 * jax.random.normal(rngs.params(), (dim,), arch.dtype)
        self.weight = nnx.Param(jnp.ones((dim,), arch.dtype) + noise)
        self.groups, self.eps = groups, arch.rms_norm_eps

    def __call__(self, y, gate):
        h = y.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))
        grouped = h.reshape(*h.shape[:-1], self.groups, -1)
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, -1, keepdims=True) + self.eps)
        return self.weight[...] * grouped.reshape(h.shape).astype(y.dtype)


class Conv1d(nnx.Module):
    """The depthwise conv's parameters as PyTorch stores them: weight [C, 1, K], bias [C]."""

    def __init__(self, spec: MambaSpec, arch: Architecture, rngs: nnx.Rngs):
        C, K = spec.conv_dim, spec.conv_kernel
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (C, 1, K), arch.dtype) * 0.3)
        if spec.conv_bias:
            self.bias = nnx.Param(jnp.zeros((C,), arch.dtype))
        self.has_bias = spec.conv_bias

    def taps(self):
        """(weight [C, K], bias [C] or None)."""
        return self.weight[...][:, 0], (self.bias[...] if self.has_bias else None)


def scan_tokens(conv, ssm, xbc, dt, row, slots, fresh, valid, mixer: Mamba2Mixer):
    """One pool's step through the state, token by token (the exact recurrence).

    conv [S, C, K - 1] and ssm [S, H, P, N]: the layer's states, one per state page; xbc
    [T, C] the conv inputs, dt [T, H] (raw); row int32[T] each token's request row, slots
    int32[R] each row's state page, fresh bool[T] (position 0: start from zeros), valid
    bool[T] (not padding). Returns (y float32[T, H, P] with the D skip, conv, ssm) with every
    valid token's request state advanced in its page (computed in float32, stored in the
    arrays' dtypes); padding tokens change nothing.
    """
    spec = mixer.spec
    H, P, N, G = spec.num_heads, spec.head_dim, spec.state_size, spec.num_groups
    weight, bias = mixer.conv1d.taps()
    A = -jnp.exp(mixer.A_log[...].astype(jnp.float32))
    D, dt_bias = mixer.D[...].astype(jnp.float32), mixer.dt_bias[...].astype(jnp.float32)
    slot = slots[jnp.minimum(row, slots.shape[0] - 1)]

    def body(carry, token):
        conv, ssm = carry
        x_t, dt_t, s, new, ok = token
        window = jnp.where(new, jnp.zeros_like(conv[s]), conv[s])
        taps = jnp.concatenate([window, x_t[:, None].astype(window.dtype)], axis=1)  # [C, K]
        out = jnp.sum(taps.astype(jnp.float32) * weight.astype(jnp.float32), axis=1)
        out = (out + (0 if bias is None else bias.astype(jnp.float32))).astype(x_t.dtype)
        out = jax.nn.silu(out).astype(jnp.float32)
        x, b, c = jnp.split(out, [H * P, H * P + G * N])
        b = jnp.repeat(b.reshape(G, N), H // G, axis=0)
        c = jnp.repeat(c.reshape(G, N), H // G, axis=0)
        x = x.reshape(H, P)
        state = jnp.where(new, 0.0, ssm[s].astype(jnp.float32))
        y, state = ssd_step(state, x, _discretize(dt_t.astype(jnp.float32), dt_bias, spec), A, b, c)
        conv = conv.at[s].set(jnp.where(ok, taps[:, 1:], conv[s]))
        ssm = ssm.at[s].set(jnp.where(ok, state.astype(ssm.dtype), ssm[s]))
        return (conv, ssm), y + D[:, None] * x

    (conv, ssm), y = jax.lax.scan(body, (conv, ssm), (xbc, dt, slot, fresh, valid))
    return y, conv, ssm


class Mamba2Mixer(nnx.Module):
    """``mixer(x, conv=None, ssm=None, token_info=None)`` (transformers' ``BambaMixer``).

    Dense (no state): x [G, T, d] whole sequences from zero state, the chunked SSD scan.
    Paged: ``conv`` [G, S, C, K - 1], ``ssm`` [G, S, H, P, N] this layer's states (one per
    state page) per pool and ``token_info`` = (row int32[G, T], pages int32[G, R], fresh
    bool[G, T], valid bool[G, T]); returns (out, conv, ssm) with the state advanced.
    """

    def __init__(self, arch: Architecture, rngs: nnx.Rngs):
        spec = arch.mamba
        assert spec is not None
        self.spec, self.dtype = spec, arch.dtype
        d, inner, H = arch.hidden_size, spec.intermediate_size, spec.num_heads
        linear = lambda i, o: nnx.Linear(
            i, o, use_bias=spec.proj_bias, dtype=arch.dtype, param_dtype=arch.dtype, rngs=rngs
        )
        self.in_proj = linear(d, inner + spec.conv_dim + H)
        self.conv1d = Conv1d(spec, arch, rngs)
        self.dt_bias = nnx.Param(jnp.ones((H,), arch.dtype))
        self.A_log = nnx.Param(jnp.log(jnp.arange(1, H + 1, dtype=jnp.float32)).astype(arch.dtype))
        self.D = nnx.Param(jnp.ones((H,), arch.dtype))
        self.norm = GatedRMSNorm(inner, spec.num_groups, arch, rngs)
        self.out_proj = linear(inner, d)

    def __call__(self, x, conv=None, ssm=None, token_info=None):
        spec, (Gp, T) = self.spec, x.shape[:2]
        H, P, N, G = spec.num_heads, spec.head_dim, spec.state_size, spec.num_groups
        gate, xbc, dt = jnp.split(
            self.in_proj(x), [spec.intermediate_size, spec.intermediate_size + spec.conv_dim], -1
        )
        if conv is None:
            weight, bias = self.conv1d.taps()
            out = jax.nn.silu(causal_conv(xbc, weight, bias)[0]).astype(jnp.float32)
            xs, b, c = jnp.split(out, [H * P, H * P + G * N], axis=-1)
            b = jnp.repeat(b.reshape(Gp, T, G, N), H // G, axis=2)
            c = jnp.repeat(c.reshape(Gp, T, G, N), H // G, axis=2)
            xs = xs.reshape(Gp, T, H, P)
            dt_bias = self.dt_bias[...].astype(jnp.float32)
            dtd = _discretize(dt.astype(jnp.float32), dt_bias, spec)
            A = -jnp.exp(self.A_log[...].astype(jnp.float32))
            y, _ = ssd_chunked(xs, dtd, A, b, c, spec.chunk_size)
            y = y + self.D[...].astype(jnp.float32)[:, None] * xs
        else:
            row, slots, fresh, valid = token_info
            y, conv, ssm = jax.vmap(
                lambda cv, sm, xb, d, r, sl, f, v: scan_tokens(cv, sm, xb, d, r, sl, f, v, self)
            )(conv, ssm, xbc, dt, row, slots, fresh, valid)
        y = self.norm(y.reshape(Gp, T, -1), gate)
        return self.out_proj(y.astype(self.dtype)), conv, ssm
