"""SwiGLU feed-forward, w2(silu(x w1) * (x w3)), with a hand-written backward pass.

The maths is plain autodiff's; the difference is where XLA may fuse. Left to
itself, XLA:CPU fuses the elementwise silu backward into the transposes that
feed the weight-gradient matmuls, and those fused strided loops took more
time than the matmuls (bench_110m on 2 cores: FFN forward+backward 0.73 s
plain, 0.43 s this way). Optimization barriers keep the elementwise parts
as plain row-major passes. That is a CPU trick: on TPU the barriers only
stop fusions, so the model uses this for `swiglu_backward: manual`, which
`auto` picks on CPU alone (AOT comparison on v5p: docs/benchmarks.md).

Letters: b batch, t time, d embed, f ffn hidden.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax.model.weight_grad import weight_gradient


def _forward(x_btd, w1_df, w3_df, w2_fd):
    gate_btf = jnp.einsum("btd,df->btf", x_btd, w1_df)
    up_btf = jnp.einsum("btd,df->btf", x_btd, w3_df)
    hidden_btf = nn.with_logical_constraint(jax.nn.silu(gate_btf) * up_btf, ("batch", "length", "mlp"))
    hidden_btf = jax.lax.optimization_barrier(hidden_btf)
    return jnp.einsum("btf,fd->btd", hidden_btf, w2_fd), (gate_btf, up_btf, hidden_btf)


@jax.custom_vjp
def swiglu(x_btd, w1_df, w3_df, w2_fd):
    """[batch, time, dim] -> [batch, time, dim]; all operands in the compute dtype."""
    return _forward(x_btd, w1_df, w3_df, w2_fd)[0]


def _swiglu_fwd(x_btd, w1_df, w3_df, w2_fd):
    out_btd, (gate_btf, up_btf, hidden_btf) = _forward(x_btd, w1_df, w3_df, w2_fd)
    return out_btd, (x_btd, gate_btf, up_btf, hidden_btf, w1_df, w3_df, w2_fd)


def _swiglu_bwd(residuals, d_out_btd):
    x_btd, gate_btf, up_btf, hidden_btf, w1_df, w3_df, w2_fd = residuals
    d_hidden_btf = jnp.einsum("btd,fd->btf", d_out_btd, w2_fd)
    d_w2_fd = weight_gradient("btf,btd->fd", hidden_btf, d_out_btd)
    sig_btf = jax.nn.sigmoid(gate_btf.astype(jnp.float32))
    gate32 = gate_btf.astype(jnp.float32)
    d_up_btf = (d_hidden_btf * gate32 * sig_btf).astype(up_btf.dtype)
    d_gate_btf = (d_hidden_btf * up_btf * sig_btf * (1 + gate32 * (1 - sig_btf))).astype(gate_btf.dtype)
    d_gate_btf, d_up_btf = jax.lax.optimization_barrier((d_gate_btf, d_up_btf))
    d_x_btd = (jnp.einsum("btf,df->btd", d_gate_btf, w1_df)
               + jnp.einsum("btf,df->btd", d_up_btf, w3_df))
    d_w1_df = weight_gradient("btd,btf->df", x_btd, d_gate_btf)
    d_w3_df = weight_gradient("btd,btf->df", x_btd, d_up_btf)
    return d_x_btd, d_w1_df, d_w3_df, d_w2_fd


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
