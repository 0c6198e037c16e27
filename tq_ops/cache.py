"""`TurboQuantCache`: a static, packed Hugging Face transformers KV cache.

Every layer holds packed buffers for batch B, Hkv kv heads and S_max slots, allocated (and
marked static for CUDA graphs) at construction when `max_batch_size` or `device` is given,
else at the first `update`, which takes B and the device from the key states:

* keys: `k_indices` uint8 (B, Hkv, S_max, packed_bytes(D, index_bits)), `k_norms`
  (B, Hkv, S_max, 1) in norm_dtype; Prod keys add `k_signs` uint8 (B, Hkv, S_max, qjl_dim/8)
  and `k_residual_norms` (B, Hkv, S_max, 1);
* values (MSE): `v_indices`, `v_norms`;
* with `center_keys`: `k_mean` float32 (B, Hkv, 1, D), each (batch, kv head)'s key mean over
  the first update (the prefill), taken when the cache is empty; every update stores
  k - k_mean, and `tq::read_cache` returns the centred keys, which attention reads exactly
  as the keys themselves (softmax is invariant to the q.k_mean added to every logit of a row);
* with `sinks` S or `window` W: `k_exact`, `v_exact` (B, Hkv, S + W, D) in the states' dtype,
  the exact (centred) vectors of the first S positions and, in a ring, of the last W
  (`ExactTokens`), and `exact_from` (0-d int64: after a `crop`, the ring lacks the positions
  below it). Every token is compressed as well; attention reads positions j < S and
  j >= max(written - W, exact_from) exact, the same set for every query of a step (in a
  multi-token update, the window as of its end);
* `cumulative_length` (0-d int64, tokens written) and `errors` (0-d int64, refused compiled
  updates: `CAPACITY | KEY_NORMS | VALUE_NORMS` bits, cleared by `reset`).

`update` writes new tokens with `tq::compress_into` and ends in `tq::read_cache`, which
returns the whole cache decompressed (so eager generation is correct but reads S_max
decompressed tokens per step) and states the written length. Compiled with the "turboquant"
backend, the pass turns "read the cache, then attend" into one `tq::attention` on the packed
buffers that stops at that length, so decompressed K/V are never materialised.

Eagerly, an update that would overflow S_max or store a norm the norm dtype cannot hold (or
inf/NaN states) raises before writing anything. A compiled step cannot raise without a host
sync: one that would overflow writes nothing and keeps the length; one with non-finite norms
stores them; either sets a bit of the layer's `errors`, and the next eager access (`update`,
`get_seq_length`, `crop`, `reorder_cache`, `check`) raises.
"""

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from . import checks
from .norms import vector_norms
from .packed import ExactTokens, PackedKeys, PackedValues
from .packing import packed_bytes
from .quantizer import (DEFAULT_CENTER_KEYS, DEFAULT_KEY_QUANTIZER, check_key_quantizer,
                        make_quantizers)

_BUFFERS = ("k_indices", "k_norms", "k_signs", "k_residual_norms", "v_indices", "v_norms")
_EXACT = ("k_exact", "v_exact")  # slots of `ExactTokens`, not positions
_PER_SEQUENCE = ("k_mean",)  # one row per (batch, kv head), not per slot
CAPACITY, KEY_NORMS, VALUE_NORMS = 1, 2, 4  # bits of a layer's `errors`


class TurboQuantLayer(CacheLayerMixin):
    """One layer's packed K/V buffers (shapes in the module docstring) and quantizer constants."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, num_heads: int, head_dim: int, k_bits: int,
                 v_bits: int, key_quantizer: str, seed: int, qjl_dim: int | None,
                 norm_dtype: torch.dtype, center_keys: bool = False, window: int = 0,
                 sinks: int = 0):
        super().__init__()
        self.k_quantizer, self.v_quantizer = make_quantizers(head_dim, k_bits, v_bits,
                                                             key_quantizer, seed, qjl_dim,
                                                             norm_dtype)
        self.max_cache_len, self.num_heads, self.head_dim = max_cache_len, num_heads, head_dim
        self.norm_dtype, self.center_keys = norm_dtype, center_keys
        self.window, self.sinks = window, sinks
        self.k_exact = self.v_exact = None
        self.k_index_bits = self.k_quantizer.index_bits  # the ops' (Prod keys: k_bits - 1)
        self.v_index_bits = self.v_quantizer.index_bits
        self.cumulative_length = torch.zeros((), dtype=torch.long)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Allocate the buffers for the states' batch size on their device (on the shared
        constants of that device). The KV head count is the states' too: under tensor
        parallelism each rank holds its share of the config's heads."""
        if key_states.dim() == 4:
            self.num_heads = key_states.shape[1]
        self._check_states(key_states, value_states)
        device, batch = key_states.device, key_states.shape[0]
        self.k_rotation, self.k_centroids, self.k_qjl = self.k_quantizer.constants_for(key_states)
        self.v_rotation, self.v_centroids, _ = self.v_quantizer.constants_for(key_states)
        self.k_plan = self.k_quantizer.plan_for(key_states)  # None on the CPU
        self.v_plan = self.v_quantizer.plan_for(key_states)
        lead = (batch, self.num_heads, self.max_cache_len)

        def zeros(last: int, dtype: torch.dtype) -> Tensor:
            return torch.zeros(lead + (last,), dtype=dtype, device=device)

        self.k_indices = zeros(packed_bytes(self.head_dim, self.k_index_bits), torch.uint8)
        self.k_norms = zeros(1, self.norm_dtype)
        prod = self.k_qjl is not None
        self.k_signs = zeros(packed_bytes(self.k_qjl.shape[0], 1), torch.uint8) if prod else None
        self.k_residual_norms = zeros(1, self.norm_dtype) if prod else None
        self.v_indices = zeros(packed_bytes(self.head_dim, self.v_index_bits), torch.uint8)
        self.v_norms = zeros(1, self.norm_dtype)
        self.k_mean = (torch.zeros(batch, self.num_heads, 1, self.head_dim, device=device)
                       if self.center_keys else None)
        if self.sinks + self.window:
            self.k_exact, self.v_exact = (
                torch.zeros(lead[:2] + (self.sinks + self.window, self.head_dim),
                            dtype=key_states.dtype, device=device) for _ in range(2))
        self.exact_from = torch.zeros((), dtype=torch.long, device=device)
        self.cumulative_length = self.cumulative_length.to(device)
        self.errors = torch.zeros((), dtype=torch.long, device=device)
        self.batch_size, self.device, self.is_initialized = batch, device, True
        if not torch.compiler.is_compiling():  # a graph cannot mark; its outputs stay unmarked
            for tensor in self.tensors() + self.constants() + [self.cumulative_length,
                                                               self.errors, self.exact_from]:
                torch._dynamo.mark_static_address(tensor)

    def tensors(self, per_slot_only: bool = False) -> list[Tensor]:
        """The K/V state buffers (what the cache's memory is): packed, exact and per-sequence,
        or only those indexed by position (per_slot_only: the packed ones); [] before
        allocation."""
        if not self.is_initialized:
            return []
        names = _BUFFERS + (() if per_slot_only else _EXACT + _PER_SEQUENCE)
        return [t for t in (getattr(self, name) for name in names) if t is not None]

    @property
    def exact_tokens(self) -> ExactTokens | None:
        """The sink and window buffers as `tq::read_cache` reads them (start 0-d), or None
        without sinks or window."""
        if self.k_exact is None:
            return None
        start = torch.maximum(self.cumulative_length - self.window, self.exact_from)
        return ExactTokens(self.k_exact, self.v_exact, start, self.sinks)

    @property
    def packed_keys(self) -> PackedKeys:
        """The key buffers and constants, as the ops read them (once allocated)."""
        return PackedKeys(self.k_indices, self.k_norms, self.k_signs, self.k_residual_norms,
                          self.k_rotation, self.k_centroids, self.k_qjl, self.k_index_bits)

    @property
    def packed_values(self) -> PackedValues:
        """The value buffers and constants, as the ops read them (once allocated)."""
        return PackedValues(self.v_indices, self.v_norms, self.v_rotation, self.v_centroids,
                            self.v_index_bits)

    def constants(self) -> list[Tensor]:
        """Rotation, codebook, QJL and compress-plan tensors of keys and values on the buffers'
        device."""
        return [t for t in (self.k_rotation, self.k_centroids, self.k_qjl, self.k_plan,
                            self.v_rotation, self.v_centroids, self.v_plan) if t is not None]

    def _check_states(self, key_states: Tensor, value_states: Tensor) -> None:
        """Metadata only (also at trace time): dtype, shape and device of both states."""
        checks.tensor("key_states", key_states, ndim=4, dtypes=checks.FLOAT_DTYPES)
        checks.tensor("value_states", value_states, ndim=4, dtypes=checks.FLOAT_DTYPES)
        heads, dim = key_states.shape[1], key_states.shape[3]
        if (heads, dim) != (self.num_heads, self.head_dim):
            raise ValueError(f"TurboQuantCache holds (kv_heads, head_dim) = "
                             f"{(self.num_heads, self.head_dim)}, got key_states of shape "
                             f"{tuple(key_states.shape)}")
        if value_states.shape != key_states.shape:
            raise ValueError(f"value_states of shape {tuple(value_states.shape)} must have the "
                             f"key_states' shape {tuple(key_states.shape)}")
        checks.same_device(key_states, value_states=value_states)
        if not self.is_initialized:
            return
        if self.k_exact is not None and key_states.dtype != self.k_exact.dtype:
            raise ValueError(f"TurboQuantCache keeps its sink and window tokens in "
                             f"{self.k_exact.dtype}, got key_states in {key_states.dtype}; "
                             "build it with dtype= the model's dtype")
        if key_states.device != self.device:
            raise ValueError(f"TurboQuantCache was allocated on {self.device}, got key_states "
                             f"on {key_states.device}; build a new cache for another device")
        if key_states.shape[0] != self.batch_size:
            raise ValueError(f"TurboQuantCache was allocated for batch size {self.batch_size}, "
                             f"got key_states of batch {key_states.shape[0]}; reset() keeps "
                             "the batch size, build a new cache for another")

    def _refusal(self, code: int) -> str:
        reasons = []
        if code & CAPACITY:
            reasons.append(f"the tokens did not fit max_cache_len={self.max_cache_len} and "
                           "were not written")
        for bit, name in ((KEY_NORMS, "key_states"), (VALUE_NORMS, "value_states")):
            if code & bit:
                hint = ("; pass norm_dtype=torch.float32 to store larger norms"
                        if self.norm_dtype != torch.float32 else "")
                reasons.append(f"{name} had non-finite values or a vector norm beyond the "
                               f"{self.norm_dtype} range, stored as inf/NaN{hint}")
        return "; ".join(reasons)

    def check(self) -> None:
        """Raise if a compiled update failed since the last `reset` (a host sync)."""
        if self.is_initialized and (code := int(self.errors)):
            raise RuntimeError("a compiled TurboQuantCache update failed "
                               f"({self._refusal(code)}); attention outputs since then are not "
                               "valid. reset() clears this")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs
               ) -> tuple[Tensor, Tensor]:
        """Append (B, Hkv, L, D) states at the current length; return the whole cache
        decompressed, (B, Hkv, S_max, D) each, in the states' dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)  # validates the states too
        else:
            self._check_states(key_states, value_states)
        length = key_states.shape[-2]
        if length > self.max_cache_len:
            raise ValueError(f"{length} tokens do not fit max_cache_len={self.max_cache_len}")
        if self.center_keys:
            mean = self.k_mean
            if length:  # an empty cache takes the mean of these states (no host sync)
                mean = torch.where(self.cumulative_length == 0,
                                   key_states.float().mean(2, keepdim=True), mean)
            key_states = key_states - mean.to(key_states.dtype)
        if checks.can_sync(self.cumulative_length):  # eager: refuse before writing anything
            self.check()
            written = int(self.cumulative_length)
            if written + length > self.max_cache_len:
                raise ValueError(f"TurboQuantCache is full: {written} of max_cache_len="
                                 f"{self.max_cache_len} slots are written, {length} more do "
                                 "not fit (crop() or reset() it, or allocate a larger one)")
            for name, states in (("key_states", key_states), ("value_states", value_states)):
                checks.storable_norms(name, vector_norms(states), self.norm_dtype)
        if self.center_keys:
            self.k_mean.copy_(mean)
        fits = self.cumulative_length + length <= self.max_cache_len
        # A compiled step that does not fit writes nothing: its positions lie past the buffers.
        start = torch.where(fits, self.cumulative_length, self.max_cache_len)
        positions = torch.arange(length, device=self.device) + start
        torch.ops.tq.compress_into(key_states, self.k_rotation, self.k_centroids, self.k_qjl,
                                   self.k_index_bits, positions, self.k_indices, self.k_norms,
                                   self.k_signs, self.k_residual_norms, self.k_plan)
        torch.ops.tq.compress_into(value_states, self.v_rotation, self.v_centroids, None,
                                   self.v_index_bits, positions, self.v_indices, self.v_norms,
                                   None, None, self.v_plan)
        if self.k_exact is not None and length:
            self._write_exact(key_states, value_states, start, fits)
        self.cumulative_length.add_(torch.where(fits, length, 0))
        if not checks.can_sync(self.cumulative_length):  # compiled: record what eager refuses
            last = positions.clamp(max=self.max_cache_len - 1)
            stored = [torch.isfinite(n.index_select(2, last)).all() for n in (self.k_norms,
                                                                              self.v_norms)]
            self.errors.bitwise_or_((~fits).long() * CAPACITY
                                    + (fits & ~stored[0]).long() * KEY_NORMS
                                    + (fits & ~stored[1]).long() * VALUE_NORMS)
        return torch.ops.tq.read_cache(*self.packed_keys, *self.packed_values,
                                       self.cumulative_length, key_states.dtype,
                                       *(self.exact_tokens or ()))

    def _write_exact(self, key_states: Tensor, value_states: Tensor, start: Tensor,
                     fits: Tensor) -> None:
        """Store the exact states of positions [start, start + L) that land in a sink slot or
        stay in the ring (the last W); no host sync, one write of each whole buffer."""
        length, ring = key_states.shape[2], self.window
        end = start + length
        slot = torch.arange(self.sinks + ring, device=self.device)
        back = end - 1 - slot  # ring slot: how far its latest position lies behind end - 1
        position = torch.where(slot < self.sinks, slot,
                               end - 1 - torch.remainder(back, max(ring, 1)))
        take = fits & (position >= start) & (position < end) & ((slot < self.sinks) | (back >= 0))
        index = (position - start).clamp(0, length - 1)
        for buffer, states in ((self.k_exact, key_states), (self.v_exact, value_states)):
            fresh = states.index_select(2, index)
            buffer.copy_(torch.where(take[:, None], fresh, buffer))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the attention mask: every slot, from 0."""
        return self.max_cache_len, 0

    def get_seq_length(self) -> Tensor | int:
        """Tokens written so far: a new 0-d tensor (not the counter itself, and not a Python
        int, so compiled steps neither sync nor specialise on it); 0 before allocation."""
        return self.cumulative_length.clone() if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Empty the cache and clear `errors`; the allocation (batch, device) stays."""
        for tensor in self.tensors():
            tensor.zero_()
        self.cumulative_length.zero_()
        if self.is_initialized:
            self.errors.zero_()
            self.exact_from.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove tokens (a negative int, as transformers'
        `StaticCache`; 0 does nothing); their slots are zeroed. Eager only (a host sync)."""
        written = int(self.cumulative_length)  # 0 before the first update
        checks.int_range("tokens_to_remove (crop takes a negative int: minus the tokens to "
                         "remove, at most those written)", tokens_to_remove, -written, 0)
        if tokens_to_remove == 0:
            return
        kept = written + tokens_to_remove
        dropped = torch.arange(kept, written, device=self.device)
        for tensor in self.tensors(per_slot_only=True):
            tensor.index_fill_(2, dropped, 0)
        if self.k_exact is not None:  # the ring no longer holds [kept - W, written - W)
            self.exact_from.clamp_(min=written - self.window)
        self.cumulative_length.fill_(kept)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Batch row b becomes row beam_idx[b] (beam search); beam_idx (B,) integer."""
        if not self.is_initialized:
            return
        checks.tensor("beam_idx", beam_idx, ndim=1, dtypes=(torch.int32, torch.int64))
        checks.shape("beam_idx", beam_idx, (self.batch_size,))
        for tensor in self.tensors():
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))


class TurboQuantCache(Cache):
    """Static TurboQuant-compressed KV cache, constructed like `StaticCache`:

        cache = TurboQuantCache(config=model.config, max_cache_len=N, k_bits=4, v_bits=3)
        model.generate(..., past_key_values=cache)

    k_bits / v_bits: user bits per coordinate; key_quantizer: "mse" or "prod" (MSE codes with
    k_bits - 1 bits + 1-bit QJL). Without max_batch_size and device the buffers are allocated at
    the first `update`, for the batch size and on the device of its key states (later updates
    must match); with either, at construction (batch 1 / CPU for the one not given). Every
    layer uses seed (keys) and seed + 1 (values), so all layers share one copy of the
    constants; per_layer_seeds=True gives layer l seeds seed + 2l and seed + 2l + 1.
    center_keys: store keys minus their per-(batch, kv head) mean over the first update
    (attention over them is exact; `k_mean` costs D fp32 per layer, batch row and kv head).
    sinks / window: attention reads the first `sinks` and the last `window` tokens exact, from
    copies kept in the states' dtype ((sinks + window) * D * 2 values per layer, batch row and
    kv head; the module docstring says which positions). dtype: that dtype when the buffers
    are allocated up front (default: the config's dtype, else float16).
    """

    def __init__(self, config, max_cache_len: int, k_bits: int = 4, v_bits: int = 3,
                 key_quantizer: str = DEFAULT_KEY_QUANTIZER, max_batch_size: int | None = None,
                 device: torch.device | str | None = None, seed: int = 0,
                 qjl_dim: int | None = None, norm_dtype: torch.dtype = torch.float16,
                 per_layer_seeds: bool = False, center_keys: bool = DEFAULT_CENTER_KEYS,
                 sinks: int = 0, window: int = 0, dtype: torch.dtype | None = None):
        if not isinstance(center_keys, bool):
            raise TypeError(f"center_keys must be a bool, got {center_keys!r}")
        checks.int_range("sinks", sinks, 0)
        checks.int_range("window", window, 0)
        if dtype is not None and dtype not in checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
        check_key_quantizer(key_quantizer, qjl_dim)
        checks.int_range("max_cache_len", max_cache_len, 1)
        if max_batch_size is not None:
            checks.int_range("max_batch_size", max_batch_size, 1)
        text = config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        stride = 2 if per_layer_seeds else 0
        layers = [TurboQuantLayer(max_cache_len, kv_heads, head_dim, k_bits, v_bits,
                                  key_quantizer, seed + stride * layer, qjl_dim, norm_dtype,
                                  center_keys, window, sinks)
                  for layer in range(text.num_hidden_layers)]
        super().__init__(layers=layers)
        if max_batch_size is not None or device is not None:
            dtype = dtype or getattr(text, "dtype", None)
            empty = torch.empty(max_batch_size or 1, kv_heads, 0, head_dim,
                                dtype=dtype if dtype in checks.FLOAT_DTYPES else torch.float16,
                                device=torch.device("cpu" if device is None else device))
            for layer in self.layers:
                layer.lazy_initialization(empty, empty)

    def check(self) -> None:
        """Raise if a compiled update of any layer was refused since the last `reset` (capacity
        or non-finite norms; see the module docstring). One host sync per layer."""
        for layer in self.layers:
            layer.check()

    def get_seq_length(self, layer_idx: int = 0) -> Tensor | int:
        if checks.can_sync(self.layers[0].cumulative_length):
            self.check()
        return super().get_seq_length(layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        self.check()
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.check()
        super().reorder_cache(beam_idx)

    def nbytes(self) -> int:
        """Bytes of the packed K/V state of all layers, `k_mean` included (constants excluded;
        0 before allocation)."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in layer.tensors())
