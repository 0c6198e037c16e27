"""`TurboQuantCache`: a static, packed Hugging Face transformers KV cache.

Every layer preallocates its packed buffers at construction (batch B, Hkv kv heads, S_max
slots) and marks them static for CUDA graphs:

* keys: `k_indices` uint8 (B, Hkv, S_max, packed_bytes(D, index_bits)), `k_norms`
  (B, Hkv, S_max, 1) in norm_dtype; Prod keys add `k_signs` uint8 (B, Hkv, S_max, qjl_dim/8)
  and `k_residual_norms` (B, Hkv, S_max, 1);
* values (MSE): `v_indices`, `v_norms`.

`update` writes new tokens with `tq::compress_into` and returns the whole cache decompressed
(`tq::decompress`), so eager generation is correct but reads S_max decompressed tokens per
step. Compiled with the "turboquant" backend, the pass fuses "decompress, then attend" into one
`tq::attention` on the packed buffers, so decompressed K/V are never materialised.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import checks
from .compile.passes import DEFAULT_KEY_QUANTIZER, KEY_QUANTIZERS
from .packing import packed_bytes
from .quantizer import TurboQuantMSE, TurboQuantProd

_BUFFERS = ("k_indices", "k_norms", "k_signs", "k_residual_norms", "v_indices", "v_norms")


class TurboQuantLayer(CacheLayerMixin):
    """One layer's packed K/V buffers (shapes in the module docstring) and quantizer constants."""

    is_compileable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, batch_size: int, num_heads: int, head_dim: int,
                 k_bits: int, v_bits: int, key_quantizer: str, seed: int,
                 qjl_dim: int | None, norm_dtype: torch.dtype, device: torch.device):
        super().__init__()
        if key_quantizer == "prod":
            keys = TurboQuantProd(head_dim, k_bits, seed, qjl_dim=qjl_dim, norm_dtype=norm_dtype)
        else:
            keys = TurboQuantMSE(head_dim, k_bits, seed, norm_dtype=norm_dtype)
        values = TurboQuantMSE(head_dim, v_bits, seed + 1, norm_dtype=norm_dtype)
        self.max_cache_len, self.batch_size, self.num_heads = max_cache_len, batch_size, num_heads
        self.head_dim, self.device = head_dim, torch.device(device)
        self.k_bits, self.v_bits = keys.index_bits, values.index_bits  # the ops' `bits`
        self.k_rotation, self.k_centroids = keys.rotation.to(device), keys.centroids.to(device)
        self.k_qjl = None if keys.qjl is None else keys.qjl.to(device)
        self.v_rotation, self.v_centroids = values.rotation.to(device), values.centroids.to(device)
        lead = (batch_size, num_heads, max_cache_len)

        def zeros(last: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(lead + (last,), dtype=dtype, device=device)

        self.k_indices = zeros(packed_bytes(head_dim, self.k_bits), torch.uint8)
        self.k_norms = zeros(1, norm_dtype)
        self.k_signs = None if self.k_qjl is None else zeros(packed_bytes(self.k_qjl.shape[0], 1),
                                                               torch.uint8)
        self.k_residual_norms = None if self.k_qjl is None else zeros(1, norm_dtype)
        self.v_indices = zeros(packed_bytes(head_dim, self.v_bits), torch.uint8)
        self.v_norms = zeros(1, norm_dtype)
        self.cumulative_length = torch.zeros((), dtype=torch.long, device=device)
        for tensor in self.tensors() + self.constants() + [self.cumulative_length]:
            torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def tensors(self) -> list[torch.Tensor]:
        """The packed K/V state buffers (what the cache's memory is)."""
        return [t for t in (getattr(self, name) for name in _BUFFERS) if t is not None]

    def constants(self) -> list[torch.Tensor]:
        """Rotation, codebook and QJL tensors of keys and values."""
        return [t for t in (self.k_rotation, self.k_centroids, self.k_qjl, self.v_rotation,
                            self.v_centroids) if t is not None]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers exist from construction; only check that the states fit them."""
        expected = (self.batch_size, self.num_heads, self.head_dim)
        got = (key_states.shape[0], key_states.shape[1], key_states.shape[-1])
        if key_states.dim() != 4 or got != expected:
            raise ValueError(f"TurboQuantCache holds (batch, kv_heads, head_dim) = {expected}, "
                             f"got key states of shape {tuple(key_states.shape)}")
        if value_states.shape != key_states.shape:
            raise ValueError(f"value states of shape {tuple(value_states.shape)} must have the "
                             f"key states' shape {tuple(key_states.shape)}")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, Hkv, L, D) states at the current length; return the whole cache
        decompressed, (B, Hkv, S_max, D) each, in the states' dtype."""
        self.lazy_initialization(key_states, value_states)
        length = key_states.shape[-2]
        positions = torch.arange(length, device=self.device) + self.cumulative_length
        torch.ops.tq.compress_into(key_states, self.k_rotation, self.k_centroids, self.k_qjl,
                                   self.k_bits, positions, self.k_indices, self.k_norms,
                                   self.k_signs, self.k_residual_norms)
        torch.ops.tq.compress_into(value_states, self.v_rotation, self.v_centroids, None,
                                   self.v_bits, positions, self.v_indices, self.v_norms, None,
                                   None)
        if checks.can_sync(positions):  # eager: refuse inf/NaN norms, as the quantizers do
            written = [t.index_select(2, positions) for t in (self.k_norms, self.v_norms)]
            try:
                checks.finite_norms(torch.cat(written, -1), self.k_norms.dtype)
            except ValueError:
                for tensor in self.tensors():
                    tensor.index_fill_(2, positions, 0)  # unwritten slots stay zero
                raise
        self.cumulative_length.add_(length)  # after the writes: a full cache raises, unchanged
        keys = torch.ops.tq.decompress(self.k_indices, self.k_norms, self.k_signs,
                                       self.k_residual_norms, self.k_rotation, self.k_centroids,
                                       self.k_qjl, self.k_bits, key_states.dtype)
        values = torch.ops.tq.decompress(self.v_indices, self.v_norms, None, None,
                                         self.v_rotation, self.v_centroids, None, self.v_bits,
                                         value_states.dtype)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the attention mask: every slot, from 0."""
        return self.max_cache_len, 0

    def get_seq_length(self) -> torch.Tensor:
        """Tokens written so far (0-d tensor, so compiled steps do not specialise on it)."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        for tensor in self.tensors():
            tensor.zero_()
        self.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for tensor in self.tensors():
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))


class TurboQuantCache(Cache):
    """Static TurboQuant-compressed KV cache, constructed like `StaticCache`:

        cache = TurboQuantCache(config=model.config, max_cache_len=N, k_bits=4, v_bits=3)
        model.generate(..., past_key_values=cache)

    k_bits / v_bits: user bits per coordinate; key_quantizer: "mse" or "prod" (MSE codes with
    k_bits - 1 bits + 1-bit QJL); max_batch_size: the batch the buffers hold; device: where they
    live (default: CPU); layer l uses seeds seed + 2l (keys) and seed + 2l + 1 (values).
    """

    def __init__(self, config, max_cache_len: int, k_bits: int = 4, v_bits: int = 3,
                 key_quantizer: str = DEFAULT_KEY_QUANTIZER, max_batch_size: int = 1,
                 device: torch.device | str | None = None, seed: int = 0,
                 qjl_dim: int | None = None, norm_dtype: torch.dtype = torch.float16):
        if key_quantizer not in KEY_QUANTIZERS:
            raise ValueError(f"key_quantizer must be one of {KEY_QUANTIZERS}, "
                             f"got {key_quantizer!r}")
        if qjl_dim is not None and key_quantizer != "prod":
            raise ValueError(f"qjl_dim applies to key_quantizer='prod' only, got "
                             f"key_quantizer={key_quantizer!r}")
        for name, value in (("max_cache_len", max_cache_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        text = config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        device = torch.device("cpu" if device is None else device)
        layers = [TurboQuantLayer(max_cache_len, max_batch_size, kv_heads, head_dim, k_bits,
                                  v_bits, key_quantizer, seed + 2 * layer, qjl_dim, norm_dtype,
                                  device)
                  for layer in range(text.num_hidden_layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes of the packed K/V state of all layers (constants excluded)."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in layer.tensors())
