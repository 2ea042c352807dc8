"""What a compiled train step moves between devices equals what the layout implies.

The step is the project's own `train_step` compiled for 8 emulated CPU
devices; its HLO is read by sharding/comms.py. Bytes are derived by hand
from the tiny model's shapes: D=64, 8 heads x 8, FFN 128, vocab 256, float32
parameters, 16 rows x 32 tokens per step.

FSDP gradients leave the backward layer scan as reduce-scatters of the
layer's gradient, (n-1)/n of its bytes (llama_jax/model/weight_grad.py;
left to XLA, CPU and TPU alike all-reduced them in full, 2(n-1)/n); the
chunked loss gathers the output head once a step and reduce-scatters its
gradient once (train/objectives/head.py), as DPO does for its policy and
reference heads; gradient accumulation under pure
data parallelism reduces once a step (train/accumulate.py).
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest

from sharding.comms import Collective, parse_collectives, replica_groups
from sharding.comms_estimate import bytes_by_kind_and_axes, estimate_step

D, HEADS, HEAD_DIM, FFN, VOCAB, ROWS, SEQ = 64, 8, 8, 128, 256, 16, 32
F32 = 4
LAYER_BYTES = F32 * (4 * D * HEADS * HEAD_DIM + 3 * D * FFN + 2 * D)  # wq wk wv wo, w1 w2 w3, 2 norms
OUTSIDE_BYTES = F32 * (2 * VOCAB * D + D)                              # embedding, output head, final norm
HEAD_BYTES = F32 * D * VOCAB
ACTIVATION_BYTES = F32 * ROWS * SEQ * D                                # one [batch, length, embed] array


@functools.cache
def _collectives(layout: str, n_layers: int = 2, grad_accum: int = 1, loss_chunk: int = 0,
                 moe: tuple = (), dpo: bool = False) -> tuple[Collective, ...]:
    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.compile.aot import train_program
    from train.config import run_config_from_dict

    run = run_config_from_dict({
        "model": {"dim": D, "n_layers": n_layers, "n_heads": HEADS, "n_kv_heads": HEADS, "ffn_dim": FFN,
                  "vocab_size": VOCAB, "max_seq_len": SEQ, "moe": dict(moe) or None},
        "layout": layout, "grad_accum": grad_accum, "loss_chunk": loss_chunk,
        # a DPO step's shapes need no pairs: the files are named, never read
        **({"dpo": {"beta": 0.1}} if dpo else {}),
        "data": {"source": "preference" if dpo else "synthetic", "vocab_size": VOCAB, "seq_len": SEQ,
                 "global_batch": ROWS, **({"paths": ["pairs.jsonl"], "tokenizer": "tok.model"} if dpo else {})}})
    placement = Placement.create(run.model, load_layout(run.layout, **run.mesh), devices=jax.devices())
    step, args = train_program(run, placement)
    with placement.activate():
        compiled = step.lower(*args).compile()
    return tuple(parse_collectives(compiled.as_text(), placement.mesh))


def test_pure_data_parallel_all_reduces_exactly_the_gradient_bytes_once():
    collectives = _collectives("dp")
    assert {(c.kind, c.axes, c.group_size) for c in collectives} == {("all-reduce", ("data",), 8)}
    # One all-reduce per layer inside the backward loop (2 runs) and one for the rest, which also
    # carries the loss's four float32 scalar sums.
    assert sorted((c.buffer_bytes, c.count) for c in collectives) == [(OUTSIDE_BYTES + 4 * F32, 1),
                                                                      (LAYER_BYTES, 2)]
    moved = 2 * 7 / 8 * (2 * LAYER_BYTES + OUTSIDE_BYTES + 4 * F32)
    assert bytes_by_kind_and_axes(collectives) == {("all-reduce", ("data",)): pytest.approx(moved, rel=1e-12)}


def test_fsdp_gathers_each_layer_in_forward_and_backward_and_reduce_scatters_its_gradient():
    n = 8
    per_layer = [c for c in _collectives("fsdp") if c.count == 2]  # inside the 2-layer scans
    assert all(c.axes == ("fsdp",) and c.group_size == n for c in per_layer)
    gathered = sum(c.buffer_bytes for c in per_layer if c.kind == "all-gather")
    scattered = sum(c.buffer_bytes for c in per_layer if c.kind == "reduce-scatter")
    assert gathered == 2 * LAYER_BYTES       # every layer parameter, once forward, once backward
    assert scattered == LAYER_BYTES          # every layer gradient, norms included, once
    assert {c.kind for c in per_layer} == {"all-gather", "reduce-scatter"}
    moved = sum(c.bytes_per_step for c in per_layer)
    assert moved == pytest.approx(2 * ((n - 1) / n * 2 * LAYER_BYTES + (n - 1) / n * LAYER_BYTES))


@pytest.mark.parametrize("loss_chunk", [0, 8])
def test_fsdp_gathers_the_output_head_once_and_reduce_scatters_its_gradient_once(loss_chunk):
    """With the loss in 4 chunks of 8 positions as without chunks: one gather, one reduce-scatter."""
    head = [c for c in _collectives("fsdp", loss_chunk=loss_chunk) if c.buffer_bytes == HEAD_BYTES]
    assert sorted((c.kind, c.axes, c.count) for c in head) == [("all-gather", ("fsdp",), 1),
                                                               ("reduce-scatter", ("fsdp",), 1)]


def test_dpo_in_chunks_gathers_each_head_once_and_reduce_scatters_the_policy_gradient_once():
    """The policy's head and the frozen reference's, each gathered once a step for 4 chunks; only
    the policy's gradient is reduced."""
    head = [c for c in _collectives("fsdp", loss_chunk=8, dpo=True) if c.buffer_bytes == HEAD_BYTES]
    assert sorted((c.kind, c.axes, c.count) for c in head) == [("all-gather", ("fsdp",), 1),
                                                               ("all-gather", ("fsdp",), 1),
                                                               ("reduce-scatter", ("fsdp",), 1)]


def test_tensor_parallel_all_reduces_per_layer_are_activation_sized():
    per_layer = [c for c in _collectives("tp") if c.count == 2]
    assert {(c.kind, c.axes, c.group_size) for c in per_layer} == {("all-reduce", ("tensor",), 8)}
    # Forward: one after attention's wo and one after the FFN's w2, each one activation. Backward:
    # the input gradients of wq, wk, wv (3 activations, one all-reduce) and of w1, w3 (2).
    assert sorted(c.buffer_bytes // ACTIVATION_BYTES for c in per_layer) == [1, 1, 2, 3]
    assert all(c.buffer_bytes % ACTIVATION_BYTES == 0 for c in per_layer)


def test_four_layers_move_exactly_two_layers_more_than_two():
    two = bytes_by_kind_and_axes(_collectives("fsdp", 2))
    four = bytes_by_kind_and_axes(_collectives("fsdp", 4))
    share = 7 / 8
    per_layer = {("all-gather", ("fsdp",)): share * 2 * LAYER_BYTES,
                 ("reduce-scatter", ("fsdp",)): share * LAYER_BYTES}
    assert set(two) == set(four)
    for key in two:
        assert four[key] - two[key] == pytest.approx(2 * per_layer.get(key, 0.0), rel=1e-12, abs=1e-6), key


def test_gradient_accumulation_reduces_data_parallel_gradients_once_a_step():
    """grad_accum 2 sums each replica's micro-batch gradients locally and all-reduces the sum
    once, with the loss's four float32 sums: the same bytes as grad_accum 1."""
    once, twice = _collectives("dp"), _collectives("dp", grad_accum=2)
    assert [(c.kind, c.axes, c.buffer_bytes, c.count) for c in twice] == [
        ("all-reduce", ("data",), 2 * LAYER_BYTES + OUTSIDE_BYTES + 4 * F32, 1)]
    assert sum(c.bytes_per_step for c in twice) == pytest.approx(sum(c.bytes_per_step for c in once), rel=1e-12)


# The same model with every FFN a mixture of 4 experts of width 64, top 1 (Llama 4's routing).
MOE = (("n_experts", 4), ("ffn_dim_expert", 64), ("top_k", 1), ("interleave_step", 1))


@pytest.mark.parametrize("layout, expert_ways, batch_ways", [("expert_fsdp", 4, 8), ("expert_fsdp_tp", 2, 4)])
def test_moe_dispatch_is_all_to_alls_over_the_expert_axis_of_the_hand_counted_bytes(layout, expert_ways,
                                                                                     batch_ways):
    """Experts split over `data`: each MoE layer sends its routed rows to their experts' devices
    and back, n slots of `capacity` rows (llama_jax/model/moe.py, `_exchanged`). Forward: the rows
    (float32 [n x capacity, D]), their expert ids (int32 [n x capacity, 1]) and the results;
    backward: the results' and the rows' gradients. Nothing else runs over `data` alone per layer
    (the all-gather dispatch it replaced gathered tokens and reduce-scattered sums there)."""
    collectives = _collectives(layout, moe=MOE)
    n_layers = 2
    tokens = ROWS * SEQ // batch_ways                      # on one device
    capacity = tokens * min(1, 4 // expert_ways)           # top 1: a token goes to one peer at most
    rows = expert_ways * capacity
    per_layer = [c for c in collectives if c.axes == ("data",) and c.count == n_layers]
    assert {c.kind for c in per_layer} == {"all-to-all"}
    assert {c.group_size for c in per_layer} == {expert_ways}
    assert sorted(c.buffer_bytes for c in per_layer) == [rows * 4] + [rows * D * F32] * 4
    moved = n_layers * (expert_ways - 1) / expert_ways * (4 * rows * D * F32 + rows * 4)
    assert bytes_by_kind_and_axes(collectives)[("all-to-all", ("data",))] == pytest.approx(moved, rel=1e-12)


# --- reading HLO that the tiny compiles above do not produce ----------------------------------

LOOP_HLO = """HloModule m

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[256]{0} get-tuple-element(%p), index=1
  %ag-start = (f32[32]{0}, f32[256]{0}) all-gather-start(%x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %ag-done = f32[256]{0} all-gather-done(%ag-start)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[256]{0}) tuple(%next, %ag-done)
}

%cond (p.1: (s32[], f32[256])) -> pred[] {
  %p.1 = (s32[], f32[256]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: f32[256]) -> f32[256] {
  %a = f32[256]{0} parameter(0)
  %zero = s32[] constant(2)
  %init = (s32[], f32[256]{0}) tuple(%zero, %a)
  %w = (s32[], f32[256]{0}) while(%init), condition=%cond, body=%body
  %r = f32[256]{0} get-tuple-element(%w), index=1
  ROOT %ar = bf16[4,8]{1,0} all-reduce(%r), channel_id=2, replica_groups={{0,2,4,6},{1,3,5,7}}, to_apply=%add
}
"""


def _mesh(**sizes):
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()[:math.prod(sizes.values())]).reshape(tuple(sizes.values())),
                tuple(sizes))


def test_loop_without_known_trip_count_counts_from_its_condition_and_async_forms_once():
    collectives = parse_collectives(LOOP_HLO, _mesh(fsdp=4, tensor=2))
    by_kind = {c.kind: c for c in collectives}
    assert set(by_kind) == {"all-gather", "all-reduce"}           # the -done is not a second one
    gather = by_kind["all-gather"]
    assert (gather.count, gather.buffer_bytes, gather.axes) == (5, 256 * 4, ("fsdp", "tensor"))  # i = 2..6
    reduce = by_kind["all-reduce"]
    assert (reduce.count, reduce.buffer_bytes, reduce.group_size, reduce.axes) == (1, 64, 4, ("fsdp",))


MEGASCALE_HLO = """HloModule m

ENTRY %main (a: f32[2,8,128]) -> f32[2,8,128] {
  %a = f32[2,8,128]{2,1,0} parameter(0)
  %after-all = token[] after-all()
  %send = (f32[2,8,128]{2,1,0}, u32[], token[]) send(%a, %after-all), channel_id=2, is_host_transfer=true, \
frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",\
_xla_megascale_reduce_operation="SUM"}
  %recv = (f32[2,8,128]{2,1,0}, u32[], token[]) recv(%after-all), channel_id=3, is_host_transfer=true, \
frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime"}
  ROOT %r = f32[2,8,128]{2,1,0} get-tuple-element(%recv), index=0
}
"""  # a backslash at a line end joins the lines: one instruction per line


def test_a_reduction_across_slices_is_a_dcn_all_reduce_over_the_axes_that_change_slice():
    """Multi-slice TPU programs hand cross-slice reductions to the DCN runtime as host-transfer
    sends; the send is the collective (its receive is not a second one)."""
    from types import SimpleNamespace

    chips = np.array([SimpleNamespace(slice_index=i // 4, coords=(i % 4, 0, 0)) for i in range(8)])
    mesh = SimpleNamespace(devices=chips.reshape(2, 4, 1), axis_names=("data", "fsdp", "tensor"))
    (send,) = parse_collectives(MEGASCALE_HLO, mesh)
    assert (send.kind, send.axes, send.dcn, send.group_size, send.count) == ("all-reduce", ("data",), True, 2, 1)
    assert send.bytes_per_step == 2 * 1 / 2 * (2 * 8 * 128 * 4)
    assert estimate_step([send], "v5p", 0.0).comm_s == pytest.approx(8192 / (50e9 / 8), rel=1e-12)


@pytest.mark.parametrize("text, groups", [
    ("replica_groups={{0,1},{2,3}}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("replica_groups=mesh['x'=2,'y'=4] {'x'}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("replica_groups=mesh['x'=2,'y'=4] {'y':(1)2}", [[0, 2], [1, 3], [4, 6], [5, 7]]),
    ("replica_groups=mesh['x'=2,'y'=4, device_ids=(7,6,5,4,3,2,1,0)] {'y'}", [[7, 6, 5, 4], [3, 2, 1, 0]]),
    ("source_target_pairs={{0,1},{1,2},{2,3}}", [[0, 1], [1, 2], [2, 3]]),
])
def test_replica_group_spellings(text, groups):
    assert replica_groups(f"%x = f32[8]{{0}} all-reduce(%y), {text}, to_apply=%add", 8).tolist() == groups


def test_estimate_arithmetic_for_one_row_by_hand():
    gib = 2**30
    gather = Collective("all-gather", "ag", gib, 64, ("fsdp",), count=80, torus_dims=3)
    reduce = Collective("all-reduce", "ar", gib, 2, ("data",), count=1, dcn=True)
    flops = 1.0e14  # compute 0.22 s < communication 0.31 s: the collectives bound the step
    est = estimate_step([gather, reduce], "v5p", flops)
    compute = 1.0e14 / 459e12
    gather_s = 80 * 63 / 64 * gib / (3 * 1200e9 / 6)        # 3 torus dims x one link's 200 GB/s
    reduce_s = 2 * 1 / 2 * gib / (50e9 / 8)                  # DCN: 50 Gbps per chip
    assert est.compute_s == pytest.approx(compute, rel=1e-12)
    assert est.comm_s_by_kind == {"all-gather": pytest.approx(gather_s, rel=1e-12),
                                  "all-reduce": pytest.approx(reduce_s, rel=1e-12)}
    assert est.step_s == pytest.approx(max(compute, gather_s + reduce_s), rel=1e-12)
    assert est.serial_step_s == pytest.approx(compute + gather_s + reduce_s, rel=1e-12)
    assert est.mfu_bound == pytest.approx(compute / (gather_s + reduce_s), rel=1e-12)
