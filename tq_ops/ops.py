"""The `tq::` operators: schemas, validation, fake shapes and device dispatch.

Each public op is a `triton_op`: its body validates the arguments, then runs the Triton
launcher for CUDA tensors (Inductor sees into those kernels) or the opaque
`tq::<name>_reference` custom op for any other device. The body doubles as the fake
implementation, so validation also runs at trace time. Semantics: ARCHITECTURE.md.

This module alone spells the readers' flat schemas that torch.library needs: each reader op
groups its arguments into `PackedKeys` / `PackedValues` (`packed.py`) once, and everything
below it (reference, kernels) takes the tuples; `attention_args` flattens them again for
callers of `tq::attention` (the compile pass, the demo).
"""

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from . import checks, masks, reference
from .norms import vector_norms
from .kernels.common import supports
from .packed import ExactTokens, PackedKeys, PackedValues, named
from .packing import packed_bytes


def _use_triton(t: Tensor, dim: int, index_bits: int, qjl: Tensor | None = None,
                compress: bool = False) -> bool:
    """Whether the Triton kernels serve a call: CUDA tensors of shapes they take
    (`kernels.common.supports`). Other shapes on CUDA run the reference on the GPU."""
    qjl_dim = None if qjl is None else qjl.shape[0]
    return t.device.type == "cuda" and supports(dim, index_bits, qjl_dim, compress=compress)


def _compress_outputs(x: Tensor, qjl: Tensor | None, index_bits: int, norm_dtype: torch.dtype):
    lead = tuple(x.shape[:-1])
    sign_bytes = 0 if qjl is None else packed_bytes(qjl.shape[0], 1)
    return (x.new_empty(lead + (packed_bytes(x.shape[-1], index_bits),), dtype=torch.uint8),
            x.new_empty(lead + (1,), dtype=norm_dtype),
            x.new_empty(lead + (sign_bytes,), dtype=torch.uint8),
            x.new_empty(lead + (0 if qjl is None else 1,), dtype=norm_dtype))


def _reference_op(name: str, fn, fake=None, mutates_args=()):
    """Register `reference.<name>` as the opaque custom op `tq::<name>_reference`."""
    op = custom_op(f"tq::{name}_reference", fn, mutates_args=mutates_args)
    if fake is not None:
        op.register_fake(fake)
    return op


_reference_op("compress", reference.compress,
              lambda x, rotation, centroids, qjl, index_bits, norm_dtype:
              _compress_outputs(x, qjl, index_bits, norm_dtype))
_reference_op("compress_into", reference.compress_into,
              mutates_args=("indices", "norms", "signs", "residual_norms"))


def _grouped(arguments: dict) -> dict:
    """A reader's arguments by name with the packed fields grouped: `keys` (names `k_*`, or
    unprefixed), `values` (`v_*`) and `exact` (`exact_*`, None when `exact_keys` is None), the
    signature of the `reference` readers."""
    prefix = "k_" if "k_indices" in arguments else ""
    packed = {"keys": named(PackedKeys, arguments, prefix)}
    names = {prefix + field for field in PackedKeys._fields}
    if "v_indices" in arguments:
        packed["values"] = named(PackedValues, arguments, "v_")
        names |= {"v_" + field for field in PackedValues._fields}
    if "exact_keys" in arguments:
        exact = named(ExactTokens, arguments, "exact_")
        packed["exact"] = None if exact.keys is None else exact
        names |= {"exact_" + field for field in ExactTokens._fields}
    return dict(packed, **{k: v for k, v in arguments.items() if k not in names})


def _reader_twin(name: str, body, fake) -> None:
    """Register `tq::<name>_reference`, the opaque CPU twin of the reader `tq::<name>`: the same
    flat schema; `body` (a `reference` function) and `fake` take the arguments `_grouped`."""
    schema = getattr(torch.ops.tq, name).default._schema
    names = [argument.name for argument in schema.arguments]
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}

    def grouped(fn):
        return lambda *args, **kwargs: fn(**_grouped(dict(defaults, **dict(zip(names, args)),
                                                          **kwargs)))

    flat = str(schema)
    op = custom_op(f"tq::{name}_reference", grouped(body), mutates_args=(),
                   schema=flat[flat.index("("):])
    op.register_fake(grouped(fake))


def _check_input(name: str, x: Tensor) -> None:
    checks.tensor(name, x, ndim=4, dtypes=checks.FLOAT_DTYPES)


def compress_plan(rotation: Tensor, centroids: Tensor, qjl: Tensor | None,
                  index_bits: int) -> Tensor | None:
    """The `plan` argument of `tq::compress` / `tq::compress_into` for these constants (on their
    device), or None where no kernel reads one (CPU, shapes the kernels do not take). Build it
    once per quantizer and device, eagerly, and pass it to every call: each compress is then one
    kernel launch. A call given no plan builds its own."""
    checks.quantizer("", rotation, centroids, qjl, index_bits, rotation.shape[0])
    checks.same_device(rotation, centroids=centroids, qjl=qjl)
    if not _use_triton(rotation, rotation.shape[0], index_bits, qjl, compress=True):
        return None
    from .kernels import compress as kernels
    return kernels.build_plan(rotation, centroids, qjl, index_bits)


def _check_plan(plan: Tensor | None, x: Tensor, index_bits: int, qjl: Tensor | None) -> None:
    if plan is None:
        return
    from .kernels.compress import plan_bytes
    checks.tensor("plan", plan, ndim=1, dtypes=(torch.uint8,))
    checks.shape("plan", plan, (plan_bytes(x.shape[-1], index_bits,
                                           None if qjl is None else qjl.shape[0]),))
    checks.same_device(x, plan=plan)


@triton_op("tq::compress", mutates_args=())
def compress(x: Tensor, rotation: Tensor, centroids: Tensor, qjl: Tensor | None, index_bits: int,
             norm_dtype: torch.dtype, plan: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (B, H, S, D) float -> (indices uint8 (B, H, S, P), norms (B, H, S, 1),
    signs uint8 (B, H, S, ceil(M/8)) or (B, H, S, 0), residual_norms (B, H, S, 1 or 0)).
    plan: `compress_plan` of these constants, or None."""
    _check_input("x", x)
    checks.quantizer("", rotation, centroids, qjl, index_bits, x.shape[-1])
    checks.same_device(x, rotation=rotation, centroids=centroids, qjl=qjl)
    _check_plan(plan, x, index_bits, qjl)
    if norm_dtype not in checks.NORM_DTYPES:
        raise TypeError(f"norm_dtype must be a floating dtype, got {norm_dtype}")
    if checks.can_sync(x):  # eager: refuse inf/NaN input and norms norm_dtype cannot hold
        checks.storable_norms("x", vector_norms(x), norm_dtype)
    if _use_triton(x, x.shape[-1], index_bits, qjl, compress=True):
        from .kernels import compress as kernels
        return kernels.compress(x, rotation, centroids, qjl, index_bits, norm_dtype, plan)
    return torch.ops.tq.compress_reference(x, rotation, centroids, qjl, index_bits, norm_dtype)


def _check_positions(positions: Tensor, length: int, capacity: int) -> None:
    checks.tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64))
    if positions.shape[0] != length:
        raise ValueError(f"positions must have one entry per token ({length}), "
                         f"got shape {tuple(positions.shape)}")
    eager = checks.can_sync(positions)  # not while tracing or capturing a CUDA graph
    if eager and length and bool(((positions < 0) | (positions >= capacity)).any()):
        raise IndexError(f"positions must lie in [0, {capacity}) (the buffer capacity), got "
                         f"range [{int(positions.min())}, {int(positions.max())}]")
    if eager and length > 1 and positions.unique().numel() < length:
        raise ValueError("positions must be distinct: two tokens written to one slot would "
                         "leave either one there")


@triton_op("tq::compress_into", mutates_args=("indices", "norms", "signs", "residual_norms"))
def compress_into(x: Tensor, rotation: Tensor, centroids: Tensor, qjl: Tensor | None,
                  index_bits: int, positions: Tensor, indices: Tensor, norms: Tensor,
                  signs: Tensor | None, residual_norms: Tensor | None,
                  plan: Tensor | None = None) -> None:
    """Compress x (B, H, S, D) into preallocated (B, H, S_max, .) buffers at slots positions (S,).

    Eager calls refuse positions outside [0, S_max); traced and CUDA-graph calls, which cannot
    check values, skip the tokens whose position lies outside (nothing is written for them).
    plan: `compress_plan` of these constants, or None."""
    _check_input("x", x)
    checks.quantizer("", rotation, centroids, qjl, index_bits, x.shape[-1])
    lead = (x.shape[0], x.shape[1], indices.shape[2] if indices.dim() == 4 else -1)
    checks.compressed("", lead, x.shape[-1], index_bits, qjl, indices, norms, signs, residual_norms)
    _check_positions(positions, x.shape[2], lead[2])
    checks.same_device(x, rotation=rotation, centroids=centroids, qjl=qjl, positions=positions,
                       indices=indices, norms=norms, signs=signs, residual_norms=residual_norms)
    _check_plan(plan, x, index_bits, qjl)
    if checks.can_sync(x):  # eager, before any write (as in compress)
        checks.storable_norms("x", vector_norms(x), norms.dtype)
    if _use_triton(x, x.shape[-1], index_bits, qjl, compress=True):
        from .kernels import compress as kernels
        kernels.compress_into(x, rotation, centroids, qjl, index_bits, positions, indices, norms,
                              signs, residual_norms, plan)
        return
    torch.ops.tq.compress_into_reference(x, rotation, centroids, qjl, index_bits, positions,
                                         indices, norms, signs, residual_norms)


def _check_keys(prefix: str, keys: PackedKeys) -> None:
    checks.tensor(f"{prefix}indices", keys.indices, ndim=4)
    checks.tensor(f"{prefix}rotation", keys.rotation, ndim=2)
    dim = keys.rotation.shape[0]
    checks.quantizer(prefix, keys.rotation, keys.centroids, keys.qjl, keys.index_bits, dim)
    checks.compressed(prefix, tuple(keys.indices.shape[:3]), dim, keys.index_bits, keys.qjl,
                      keys.indices, keys.norms, keys.signs, keys.residual_norms)
    tensors = keys._asdict()
    del tensors["indices"], tensors["index_bits"]
    checks.same_device(keys.indices, **{prefix + k: v for k, v in tensors.items()})


def _check_pair(keys: PackedKeys, values: PackedValues) -> None:
    _check_keys("k_", keys)
    _check_keys("v_", values.as_keys())
    checks.shape("v_norms", values.norms, tuple(keys.norms.shape))


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")


def _reads_on_triton(t: Tensor, keys: PackedKeys) -> bool:
    """`_use_triton` for reading `keys` (or values `as_keys`) next to tensor t."""
    return _use_triton(t, keys.rotation.shape[0], keys.index_bits, keys.qjl)


@triton_op("tq::decompress", mutates_args=())
def decompress(indices: Tensor, norms: Tensor, signs: Tensor | None, residual_norms: Tensor | None,
               rotation: Tensor, centroids: Tensor, qjl: Tensor | None, index_bits: int,
               dtype: torch.dtype) -> Tensor:
    """Packed fields of (B, H, S) vectors -> reconstruction (B, H, S, D) in `dtype`."""
    keys = PackedKeys(indices, norms, signs, residual_norms, rotation, centroids, qjl, index_bits)
    _check_keys("", keys)
    _check_dtype(dtype)
    return _decompress(keys, dtype)


def _decompress(keys: PackedKeys, dtype: torch.dtype) -> Tensor:
    """Device dispatch of decompress (arguments already checked)."""
    if _reads_on_triton(keys.indices, keys):
        from .kernels import decompress as kernels
        return kernels.decompress(keys, dtype)
    return torch.ops.tq.decompress_reference(*keys, dtype)


_reader_twin("decompress", reference.decompress, lambda keys, dtype: keys.norms.new_empty(
    tuple(keys.norms.shape[:-1]) + (keys.rotation.shape[0],), dtype=dtype))


@triton_op("tq::read_cache", mutates_args=())
def read_cache(k_indices: Tensor, k_norms: Tensor, k_signs: Tensor | None,
               k_residual_norms: Tensor | None, k_rotation: Tensor, k_centroids: Tensor,
               k_qjl: Tensor | None, k_index_bits: int, v_indices: Tensor, v_norms: Tensor,
               v_rotation: Tensor, v_centroids: Tensor, v_index_bits: int, written: Tensor,
               dtype: torch.dtype, exact_keys: Tensor | None = None,
               exact_values: Tensor | None = None, exact_start: Tensor | None = None,
               exact_sinks: int = 0) -> tuple[Tensor, Tensor]:
    """One layer of a packed cache, read: keys and values (B, H, S_max, D) in `dtype`.

    `written` (0-d int32/int64) is how many slots, from 0, the cache has filled; the slots past
    it hold zeros. With `ExactTokens` (exact_start 0-d here, like `written`) the positions it
    names hold their exact vectors instead of the decompressed ones. This op is the cache's
    contract with the compile pass: an attention over its two outputs becomes one
    `tq::attention` on the packed fields (and exact tokens) that stops at `written` (kv_lens)
    wherever a mask hides the unwritten slots.
    """
    keys = PackedKeys(k_indices, k_norms, k_signs, k_residual_norms, k_rotation, k_centroids,
                      k_qjl, k_index_bits)
    values = PackedValues(v_indices, v_norms, v_rotation, v_centroids, v_index_bits)
    _check_pair(keys, values)
    checks.tensor("written", written, ndim=0, dtypes=(torch.int32, torch.int64))
    checks.same_device(k_indices, v_indices=v_indices, written=written)
    _check_dtype(dtype)
    if exact_start is not None:
        checks.tensor("exact_start", exact_start, ndim=0, dtypes=(torch.int32, torch.int64))
    batch = k_indices.shape[0]
    exact = ExactTokens(exact_keys, exact_values,
                        None if exact_start is None else exact_start.expand(batch), exact_sinks)
    _check_exact(exact, keys, values, written.expand(batch))
    k_hat, v_hat = _decompress(keys, dtype), _decompress(values.as_keys(), dtype)
    if exact_keys is None:
        return k_hat, v_hat
    return _overlay(k_hat, v_hat, exact, written)


def _check_query(query: Tensor, indices: Tensor, dim) -> None:
    _check_input("query", query)
    checks.same_device(query, indices=indices)
    if query.shape[0] != indices.shape[0]:
        raise ValueError(f"query batch {query.shape[0]} != compressed batch {indices.shape[0]}")
    if query.shape[-1] != dim:
        raise ValueError(f"query head_dim {query.shape[-1]} != compressed head_dim {dim}")
    checks.grouped_heads(query, indices.shape[1])


@triton_op("tq::scores", mutates_args=())
def scores(query: Tensor, indices: Tensor, norms: Tensor, signs: Tensor | None,
           residual_norms: Tensor | None, rotation: Tensor, centroids: Tensor,
           qjl: Tensor | None, index_bits: int) -> Tensor:
    """Unscaled logits (B, Hq, Lq, Lk) in the query dtype for query (B, Hq, Lq, D)."""
    keys = PackedKeys(indices, norms, signs, residual_norms, rotation, centroids, qjl, index_bits)
    _check_keys("", keys)
    _check_query(query, indices, rotation.shape[0])
    if _reads_on_triton(query, keys):
        from .kernels import scores as kernels
        return kernels.scores(query, keys)
    return torch.ops.tq.scores_reference(query, *keys)


_reader_twin("scores", reference.scores, lambda query, keys: query.new_empty(
    tuple(query.shape[:-1]) + (keys.indices.shape[2],)))


def _check_mask(attn_mask: Tensor | None, kv_lens: Tensor | None, full: tuple) -> None:
    if attn_mask is not None:
        checks.tensor("attn_mask", attn_mask, dtypes=(torch.bool,) + checks.FLOAT_DTYPES)
        try:
            broadcast = torch.broadcast_shapes(attn_mask.shape, full)
        except RuntimeError:
            broadcast = None
        if broadcast is None or tuple(broadcast) != tuple(full):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(B, Hq, Lq, Lk) = {tuple(full)}")
    if kv_lens is not None:
        checks.tensor("kv_lens", kv_lens, ndim=1, dtypes=(torch.int32, torch.int64))
        checks.shape("kv_lens", kv_lens, (full[0],))
        # eager only (a host sync): outside [0, Lk] the CUDA kernel and the reference disagree
        eager = checks.can_sync(kv_lens)
        if eager and full[0] and bool(((kv_lens < 0) | (kv_lens > full[3])).any()):
            raise ValueError(f"kv_lens must lie in [0, {full[3]}] (the key length), got range "
                             f"[{int(kv_lens.min())}, {int(kv_lens.max())}]")


def _check_exact(exact: ExactTokens, keys: PackedKeys, values: PackedValues,
                 kv_lens: Tensor | None) -> None:
    """`ExactTokens` beside keys and values: all three tensors or none (then sinks 0), shapes
    (B, Hkv, sinks + ring, D), start (B,), kv_lens given (exact positions follow it); eagerly,
    kv_lens[b] - start[b] <= ring (a host sync)."""
    given = [t is not None for t in exact[:3]]
    if not any(given):
        checks.int_range("exact_sinks (without exact tensors)", exact.sinks, 0, 0)
        return
    if not all(given):
        raise ValueError("exact_keys, exact_values and exact_start go together: pass all three "
                         "or none")
    if kv_lens is None:
        raise ValueError("exact_keys need kv_lens: exact positions are counted from each row's "
                         "length")
    checks.tensor("exact_keys", exact.keys, ndim=4, dtypes=checks.FLOAT_DTYPES)
    checks.tensor("exact_values", exact.values, ndim=4, dtypes=(exact.keys.dtype,))
    checks.tensor("exact_start", exact.start, ndim=1, dtypes=(torch.int32, torch.int64))
    lead = tuple(keys.indices.shape[:2])
    slots = exact.keys.shape[2]
    checks.int_range(f"exact_sinks (at most the {slots} exact slots)", exact.sinks, 0, slots)
    checks.shape("exact_keys", exact.keys, lead + (slots, keys.rotation.shape[0]))
    checks.shape("exact_values", exact.values, lead + (slots, values.rotation.shape[0]))
    checks.shape("exact_start", exact.start, lead[:1])
    checks.same_device(keys.indices, exact_keys=exact.keys, exact_values=exact.values,
                       exact_start=exact.start)
    ring = slots - exact.sinks
    if lead[0] and checks.can_sync(exact.start) and bool((kv_lens - exact.start > ring).any()):
        raise ValueError(f"exact_start must be at least kv_lens - {ring} (the ring's slots), got "
                         f"kv_lens - exact_start up to {int((kv_lens - exact.start).max())}")


@triton_op("tq::attention", mutates_args=())
def attention(query: Tensor, k_indices: Tensor, k_norms: Tensor, k_signs: Tensor | None,
              k_residual_norms: Tensor | None, k_rotation: Tensor, k_centroids: Tensor,
              k_qjl: Tensor | None, k_index_bits: int, v_indices: Tensor, v_norms: Tensor,
              v_rotation: Tensor, v_centroids: Tensor, v_index_bits: int, scale: float,
              is_causal: bool, attn_mask: Tensor | None, kv_lens: Tensor | None,
              exact_keys: Tensor | None = None, exact_values: Tensor | None = None,
              exact_start: Tensor | None = None, exact_sinks: int = 0) -> Tensor:
    """softmax(scale * q.k_hat + mask) @ v_hat -> (B, Hq, Lq, Dv) in the query dtype; the
    positions `ExactTokens(exact_keys, exact_values, exact_start, exact_sinks)` names read their
    exact k and v instead."""
    keys = PackedKeys(k_indices, k_norms, k_signs, k_residual_norms, k_rotation, k_centroids,
                      k_qjl, k_index_bits)
    values = PackedValues(v_indices, v_norms, v_rotation, v_centroids, v_index_bits)
    exact = ExactTokens(exact_keys, exact_values, exact_start, exact_sinks)
    _check_pair(keys, values)
    _check_query(query, k_indices, k_rotation.shape[0])
    checks.same_device(query, v_indices=v_indices, attn_mask=attn_mask, kv_lens=kv_lens)
    full = (query.shape[0], query.shape[1], query.shape[2], k_indices.shape[2])
    _check_mask(attn_mask, kv_lens, full)
    _check_exact(exact, keys, values, kv_lens)
    exact = None if exact_keys is None else exact
    scale, is_causal = float(scale), bool(is_causal)
    if not (_reads_on_triton(query, keys) and _reads_on_triton(query, values.as_keys())):
        return torch.ops.tq.attention_reference(
            *attention_args(query, keys, values, scale, is_causal, attn_mask, kv_lens, exact))
    from .kernels import attention as fused, decompress as unpack, prefill
    # Prefills run faster as fp16 SDPA over decompressed K and V (prefill.py); the rest fused.
    if prefill.flash_prefill_applies(query, keys, values, attn_mask, kv_lens):
        k_hat = unpack.decompress(keys, torch.float16)
        v_hat = unpack.decompress(values.as_keys(), torch.float16)
        if exact is not None:
            k_hat, v_hat = _overlay(k_hat, v_hat, exact, kv_lens)
        return prefill.flash_prefill(query, k_hat, v_hat, scale, is_causal, attn_mask, kv_lens)
    return fused.fused_attention(query, keys, values, scale, is_causal, attn_mask, kv_lens,
                                 exact)


_reader_twin("attention", reference.attention,
             lambda query, keys, values, scale, is_causal, attn_mask, kv_lens, exact:
             query.new_empty(tuple(query.shape[:-1]) + (values.rotation.shape[0],)))


def attention_args(query: Tensor, keys: PackedKeys, values: PackedValues, scale: float,
                   is_causal: bool, attn_mask: Tensor | None = None,
                   kv_lens: Tensor | None = None, exact: ExactTokens | None = None) -> tuple:
    """The flat arguments of `tq::attention` (the schema above) from the packed tuples; the
    tuples may hold FX nodes (the compile pass builds its call with them)."""
    return (query, *keys, *values, scale, is_causal, attn_mask, kv_lens,
            *(exact or (None, None, None, 0)))


def _overlay(k_hat: Tensor, v_hat: Tensor, exact: ExactTokens,
             written: Tensor) -> tuple[Tensor, Tensor]:
    """Decompressed keys and values (B, H, S, D) with the `exact` positions replaced by their
    exact vectors (`masks.overlay_exact`); written (B,) or 0-d: each row's length."""
    batch, _, slots, _ = k_hat.shape
    lengths = written.expand(batch).long()
    positions = torch.arange(slots, device=k_hat.device)
    start = exact.start.expand(batch).long()
    return tuple(masks.overlay_exact(t, buffer, lengths, start, exact.sinks, positions)
                 for t, buffer in ((k_hat, exact.keys), (v_hat, exact.values)))
