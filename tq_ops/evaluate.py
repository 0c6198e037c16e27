"""`tq-ops eval`: what K/V cache compression does to a causal LM's next-token predictions.

A Hugging Face causal LM (a local checkpoint, or a small random Llama built in code) reads a
token sequence in sliding windows (`max_length` tokens, advancing by `stride`; each token is
scored once, with up to `max_length - stride` tokens of context before it). For each scheme
the scored tokens give perplexity and, against the uncompressed model's distribution at the
same position, the KL divergence KL(p_uncompressed || p_scheme) in nats and top-1 agreement.

Schemes (K and V bits per coordinate given per scheme):
* "uncompressed": the model as loaded (counted as an fp16 cache: 16 bits per element).
* "tq": TurboQuant through `torch.compile(model, backend=tq_ops.backend(mode="simulate"))`:
  every attention call compresses its K and V, MSE or Prod keys; with the lever "center"
  (`center_keys=True`, the backend's default) each (batch, kv head)'s key mean is subtracted
  first; with "scale" (`scale_keys=True`) each key channel is divided by its spread and the
  query multiplied by it. Levers the backend does not have yet are simulated here, eagerly,
  with the same quantizers (site l's seeds) on the same centred / scaled keys: a window of
  the W most recent and the S first ("sink") tokens that each query reads exact, "edges"
  (one more bit for K and V in the first and last layers), "vcenter" (values centred) and
  "split" (half the channels at one more bit; `Scheme`).
* "rtn": per-token asymmetric integer round-to-nearest, min/max over head_dim per token and
  head, fp16 scale and zero.
* "kivi": KIVI-style: keys per channel over groups of `group` tokens, values per token, fp16
  scale and zero. A query sees the keys and values of its own, not yet full, group in full
  precision, as KIVI keeps the tokens of an incomplete group unquantized (its residual).
RTN, KIVI and the eager tq rows fake-quantize K and V inside the model's attention (an
`AttentionInterface` wrapper around transformers' "sdpa").

Bits per element count what is stored per head, metadata included (d = head_dim, G = group):
tq MSE b + 16/d (fp16 norm), tq Prod b + 32/d (norm and residual norm), RTN b + 32/d,
KIVI keys b + 32/G and values b + 32/d (the fp16 residual of fewer than G tokens is not
counted); "edges" rows average over layers. Bytes per token sum K and V over all layers and
KV heads. A key mean is stored once per sequence, not per token, as are a key scale and the
window and sink tokens: `sequence_bytes` reports them apart (fp32 means and scales, D per layer
and KV head each; fp16 K and V of W + S tokens), and "bits @32k" counts everything over a
32,768-token sequence.
"""

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass, field

import torch

from . import checks
from .compile import backend
from .quantizer import DEFAULT_CENTER_KEYS, make_quantizers, scale_key_channels
from .packing import packed_bytes

METHODS = ("uncompressed", "tq", "rtn", "kivi")
LEVERS = ("center", "scale", "edges", "vcenter", "split")
SPLIT_SHARE = 2  # the lever "split": head_dim // 2 channels at one more bit (b + 0.5 bits)
CONTEXT = 32768  # the sequence length of the "bits @32k" column
FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class Scheme:
    """One row of the table: method (one of METHODS), user bits per coordinate for K and V
    (None for "uncompressed"), the key quantizer of "tq" ("mse" or "prod"), whether "tq"
    centres the keys (the lever "center"; None: the backend's default for "tq", off for the
    other methods) and scales their channels (the lever "scale"). Simulated eagerly in the
    eval tool: `window` most recent and `sinks` first tokens read in full precision by each
    query (what `TurboQuantCache(window=, sinks=)` gives one-token decode steps; the backend's
    simulate mode has no such option), `edge_bits` more bits for K and V of the first and
    last layers (the lever "edges": 1), `center_values`, values minus their mean over the
    sequence compressed and the mean added back (the lever "vcenter"), and `split`, the
    paper's outlier-channel split for fractional widths: the head_dim // SPLIT_SHARE channels
    of largest RMS over the sequence (per batch row and KV head, after centring and scaling)
    at one more bit, the rest at the scheme's bits, each part (its channels in decreasing RMS
    order) its own TurboQuant instance (rotation, norm, codebook of its dimension): K2/V2
    +split stores 2.5 bits per coordinate (the paper's 32 of 128 channels at 3 bits store
    2.25, not the 2.5 it states). The lever "split"; none of the three has a backend or cache
    option."""

    method: str
    k_bits: int | None = None
    v_bits: int | None = None
    key_quantizer: str = "mse"
    center_keys: bool | None = None
    scale_keys: bool = False
    window: int = 0
    sinks: int = 0
    edge_bits: int = 0
    center_values: bool = False
    split: bool = False

    def __post_init__(self):
        if self.center_keys is None:
            object.__setattr__(self, "center_keys", self.method == "tq" and DEFAULT_CENTER_KEYS)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method != "uncompressed":
            for name in ("k_bits", "v_bits"):
                checks.int_range(name, getattr(self, name), 1, 8)
        for lever in ("center_keys", "scale_keys", "window", "sinks", "edge_bits",
                      "center_values", "split"):
            if getattr(self, lever) and self.method != "tq":
                raise ValueError(f"{lever} applies to method 'tq' only, got {self.method!r}")
        for name in ("window", "sinks"):
            checks.int_range(name, getattr(self, name), 0)
        if self.method == "tq":
            checks.int_range("edge_bits", self.edge_bits, 0,
                             8 - max(self.k_bits, self.v_bits) - self.split)

    @property
    def eager(self) -> bool:
        """Whether the scheme needs levers the backend does not have (window, sinks, edges,
        vcenter, split)."""
        return bool(self.window or self.sinks or self.edge_bits or self.center_values
                    or self.split)

    @property
    def name(self) -> str:
        if self.method == "uncompressed":
            return "uncompressed"
        label = {"tq": "tq", "rtn": "per-token RTN", "kivi": "KIVI-style"}[self.method]
        suffix = f" {self.key_quantizer}" if self.method == "tq" else ""
        suffix += " +center" if self.center_keys else ""
        suffix += " +scale" if self.scale_keys else ""
        suffix += f" +window{self.window}" if self.window else ""
        suffix += f" +sinks{self.sinks}" if self.sinks else ""
        suffix += f" +edges{self.edge_bits}" if self.edge_bits else ""
        suffix += " +vcenter" if self.center_values else ""
        suffix += " +split" if self.split else ""
        return f"{label} K{self.k_bits}/V{self.v_bits}{suffix}"


def default_schemes(bits: list[tuple[int, int]], key_quantizers=("mse",), levers=(),
                    baselines: bool = True, windows=(0,), sinks: int = 0) -> list[Scheme]:
    """Uncompressed, then for each (k_bits, v_bits): tq with each key quantizer at the
    backend's defaults (with each lever of `levers` both off and on instead; one row per
    full-precision window of `windows`, 0 = none, with `sinks` sink tokens where the window
    is not 0), then RTN and KIVI unless baselines=False."""
    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise ValueError(f"levers must be among {LEVERS}, got {sorted(unknown)}")
    schemes = [Scheme("uncompressed")]
    for k, v in bits:
        for kq in key_quantizers:
            centring = (False, True) if "center" in levers else (DEFAULT_CENTER_KEYS,)
            scaling = (False, True) if "scale" in levers else (False,)
            edges = (0, 1) if "edges" in levers else (0,)
            vcentring = (False, True) if "vcenter" in levers else (False,)
            splits = (False, True) if "split" in levers else (False,)
            schemes += [Scheme("tq", k, v, kq, center_keys=c, scale_keys=s, window=w,
                               sinks=sinks if w else 0, edge_bits=e, center_values=cv,
                               split=sp)
                        for c in centring for s in scaling for w in windows for e in edges
                        for cv in vcentring for sp in splits]
        schemes += [Scheme("rtn", k, v), Scheme("kivi", k, v)] if baselines else []
    return schemes


def layer_bits(scheme: Scheme, layer: int, layers: int) -> tuple[int, int]:
    """(k_bits, v_bits) of "tq" in `layer` of `layers`: edge_bits more in the first and last."""
    extra = scheme.edge_bits if layer in (0, layers - 1) else 0
    return scheme.k_bits + extra, scheme.v_bits + extra


def bits_per_element(scheme: Scheme, head_dim: int, group: int,
                     layers: int = 1) -> tuple[float, float]:
    """(key, value) stored bits per compressed K/V element, metadata included (tq: the mean
    over `layers` layers)."""
    d = head_dim
    if scheme.method == "uncompressed":
        return 16.0, 16.0
    if scheme.method == "tq":
        def stored(bits: int, prod: bool) -> int:  # bits of one vector (each part of a split)
            parts = [(d - d // SPLIT_SHARE, bits), (d // SPLIT_SHARE, bits + 1)] \
                if scheme.split else [(d, bits)]
            if prod:  # (b-1)-bit codes, QJL signs, two fp16 norms per part
                return sum(8 * (packed_bytes(n, b - 1) + packed_bytes(n, 1)) + 32
                           for n, b in parts)
            return sum(8 * packed_bytes(n, b) + 16 for n, b in parts)

        key = value = 0.0
        for layer in range(layers):
            k_bits, v_bits = layer_bits(scheme, layer, layers)
            key += stored(k_bits, scheme.key_quantizer == "prod")
            value += stored(v_bits, False)
        return key / d / layers, value / d / layers
    value = scheme.v_bits + 32 / d  # per-token fp16 scale and zero
    key = scheme.k_bits + (32 / d if scheme.method == "rtn" else 32 / group)
    return key, value


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


# ----------------------------------------------------------------------------- fake quantizers

def fake_quantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric round-to-nearest of x along `dim`, as stored and read back.

    Each slice along `dim` gets zero = min and scale = (max - min) / (2^bits - 1), both rounded
    to fp16 as they would be stored; codes are round((x - zero) / scale) clamped to
    [0, 2^bits - 1]. Computed in float32, returned in x.dtype, same shape.
    """
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    scale = (hi - lo) / (2 ** bits - 1)
    if not (lo.abs().max() <= FP16_MAX and scale.max() <= FP16_MAX):
        raise ValueError("fake_quantize: a scale or zero exceeds the float16 range (or is NaN)")
    zero, scale = lo.half().float(), scale.half().float()
    codes = torch.round((xf - zero) / torch.where(scale > 0, scale, 1.0))
    return (codes.clamp(0, 2 ** bits - 1) * scale + zero).to(x.dtype)


def kivi_keys(k: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """k (B, H, S, D): each channel quantized over each full group of `group` tokens; the
    last S % group tokens are returned unchanged."""
    full = k.shape[2] // group * group
    grouped = k[:, :, :full].unflatten(2, (full // group, group))
    quantized = fake_quantize(grouped, bits, dim=3).flatten(2, 3)
    return torch.cat([quantized, k[:, :, full:]], dim=2)


def quantized_for_query(q_len: int, k_len: int, group: int, device) -> torch.Tensor:
    """(q_len, k_len) bool: True where key j lies in a group that is full when query i (at
    position k_len - q_len + i) is decoded, i.e. KIVI reads it quantized."""
    position = torch.arange(q_len, device=device) + k_len - q_len
    group_end = (torch.arange(k_len, device=device) // group + 1) * group
    return group_end[None, :] <= position[:, None] + 1


def _visible(mask, q_len: int, k_len: int, device) -> torch.Tensor:
    """The attention mask as given to "sdpa" (None = causal, bottom-right aligned)."""
    if mask is not None:
        return mask
    position = torch.arange(q_len, device=device) + k_len - q_len
    return torch.arange(k_len, device=device)[None, :] <= position[:, None]


def rtn_attention(bits: tuple[int, int]):
    """An attention function (transformers' AttentionInterface signature) that fake-quantizes
    K and V per token, then runs "sdpa"."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(module, query, key, value, attention_mask, **kwargs):
        key, value = fake_quantize(key, bits[0], -1), fake_quantize(value, bits[1], -1)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return attend


def mixed_attention(module, query, key, value, key_read, value_read, read, attention_mask,
                    **kwargs):
    """transformers' "sdpa" where query i reads key and value j from `key_read` / `value_read`
    (quantized copies, shaped as key / value) where read[i, j] ((q_len, k_len) bool) and exact
    elsewhere: both copies are appended along the key axis and the mask shows each query one."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, k_len = query.shape[2], key.shape[2]
    visible = _visible(attention_mask, q_len, k_len, query.device)
    choose = torch.cat([~read, read], dim=-1)
    visible = torch.cat([visible, visible], dim=-1)
    if visible.dtype == torch.bool:
        mask = visible & choose
    else:
        mask = visible.masked_fill(~choose, float("-inf"))
    kwargs["is_causal"] = False
    return sdpa_attention_forward(module, query, torch.cat([key, key_read], dim=2),
                                  torch.cat([value, value_read], dim=2), mask, **kwargs)


def kivi_attention(bits: tuple[int, int], group: int):
    """An attention function (AttentionInterface signature) for KIVI-style K/V: each query
    reads the quantized copy of keys in full groups and the exact copy of the others."""

    def attend(module, query, key, value, attention_mask, **kwargs):
        old = quantized_for_query(query.shape[2], key.shape[2], group, query.device)
        return mixed_attention(module, query, key, value, kivi_keys(key, bits[0], group),
                               fake_quantize(value, bits[1], -1), old, attention_mask, **kwargs)

    return attend


def exact_for_query(q_len: int, k_len: int, window: int, sinks: int, device) -> torch.Tensor:
    """(q_len, k_len) bool: True where query i (at position k_len - q_len + i) reads key j in
    full precision: one of the first `sinks` tokens or of the `window` most recent (the query's
    own token included)."""
    position = torch.arange(q_len, device=device) + k_len - q_len
    key = torch.arange(k_len, device=device)[None, :]
    return (key < sinks) | (key > position[:, None] - window)


def round_trip(quantizer, x: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D) compressed by a TurboQuantMSE / TurboQuantProd and decompressed, in x's
    dtype."""
    return quantizer.dequantize(*quantizer.quantize(x), dtype=x.dtype)


def tq_attention(scheme: Scheme, layers: int):
    """An attention function (AttentionInterface signature) for "tq" with the levers the
    backend lacks (`Scheme.eager`). K and V of layer l go through the quantizers of the
    backend's simulate site l (seed 2l, bits `layer_bits`), the keys centred and scaled as the
    backend does, the values centred with "vcenter"; each query reads its window and sink
    tokens exact (`exact_for_query`)."""

    @functools.lru_cache(maxsize=None)
    def quantizers(layer: int, k_dim: int, v_dim: int, extra: int = 0):
        k_bits, v_bits = layer_bits(scheme, layer, layers)
        return make_quantizers(k_dim, k_bits + extra, v_bits + extra, scheme.key_quantizer,
                               2 * layer, v_head_dim=v_dim)

    def compressed(layer: int, x: torch.Tensor, which: int) -> torch.Tensor:
        """x (keys: which 0, values: 1) round-tripped, split into two parts with "split"."""
        if not scheme.split:
            return round_trip(quantizers(layer, x.shape[-1], x.shape[-1])[which], x)
        dim = x.shape[-1]
        high = dim // SPLIT_SHARE
        order = x.pow(2).mean(-2, keepdim=True).argsort(-1, descending=True).expand(x.shape)
        parts = x.gather(-1, order)
        parts = torch.cat([round_trip(quantizers(layer, high, high, 1)[which], parts[..., :high]),
                           round_trip(quantizers(layer, dim - high, dim - high)[which],
                                      parts[..., high:])], -1)
        return torch.empty_like(x).scatter_(-1, order, parts)

    def attend(module, query, key, value, attention_mask, **kwargs):
        if scheme.center_keys:
            key = key - key.mean(-2, keepdim=True)
        if scheme.scale_keys:
            query, key = scale_key_channels(query, key)
        exact = exact_for_query(query.shape[2], key.shape[2], scheme.window, scheme.sinks,
                                query.device)
        mean = value.mean(-2, keepdim=True) if scheme.center_values else 0.0
        value_read = compressed(module.layer_idx, value - mean, 1) + mean  # weights sum to 1
        return mixed_attention(module, query, key, value, compressed(module.layer_idx, key, 0),
                               value_read, ~exact, attention_mask, **kwargs)

    return attend


# ----------------------------------------------------------------------------- runners

class _AttentionSwap:
    """Runs the model with a registered attention function, then restores "sdpa". The
    function gets the masks "sdpa" gets (a name without a mask function of its own gets None
    for sliding-window layers, as flash kernels that window by themselves do)."""

    def __init__(self, model, name: str, function):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)
        self.model, self.name = model, name

    def __call__(self, ids: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """Logits of the last `keep` positions of ids (all for 0)."""
        self.model.set_attn_implementation(self.name)
        try:
            return self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        finally:
            self.model.set_attn_implementation("sdpa")


class _Compiled:
    """The model compiled with the "turboquant" backend in simulate mode; checks that the pass
    rewrote one attention site per layer."""

    def __init__(self, model, scheme: Scheme, layers: int):
        self.compiler = backend(k_bits=scheme.k_bits, v_bits=scheme.v_bits,
                                key_quantizer=scheme.key_quantizer, mode="simulate",
                                center_keys=scheme.center_keys,
                                scale_keys=scheme.scale_keys)
        self.compiled = torch.compile(model, backend=self.compiler, dynamic=False)
        self.scheme, self.layers = scheme, layers

    def __call__(self, ids: torch.Tensor, keep: int = 0) -> torch.Tensor:
        logits = self.compiled(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        if len(self.compiler.sites) < self.layers:
            raise RuntimeError(f"{self.scheme.name}: the turboquant pass rewrote "
                               f"{len(self.compiler.sites)} attention sites for {self.layers} "
                               "layers (see the 'tq_ops' logger for the reasons)")
        return logits


def _runner(model, scheme: Scheme, layers: int, group: int):
    if scheme.method == "tq" and scheme.eager:
        name = "".join(c if c.isalnum() else "_" for c in scheme.name)
        return _AttentionSwap(model, f"tq_eval_{name}", tq_attention(scheme, layers))
    if scheme.method == "tq":
        return _Compiled(model, scheme, layers)
    bits = (scheme.k_bits, scheme.v_bits)
    if scheme.method == "rtn":
        return _AttentionSwap(model, f"tq_eval_rtn_{bits[0]}_{bits[1]}", rtn_attention(bits))
    return _AttentionSwap(model, f"tq_eval_kivi_{bits[0]}_{bits[1]}_g{group}",
                          kivi_attention(bits, group))


# ----------------------------------------------------------------------------- evaluation

def windows(n: int, max_length: int, stride: int):
    """Yield (begin, end, first) for the sliding windows over n tokens: the window is
    tokens [begin, end) and tokens [first, end) are scored in it (each token once)."""
    checks.int_range("max_length", max_length, 2)
    checks.int_range("stride", stride, 1, max_length - 1)
    if n < 2:
        raise ValueError(f"need at least 2 tokens, got {n}")
    scored = 1
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        yield begin, end, scored
        scored = end
        if end == n:
            return


class _Progress:
    """tqdm when installed, else a counter on stderr; silent when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.bar, self.total, self.done, self.enabled = None, total, 0, enabled
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc="tq-ops eval", unit="window", file=sys.stderr)
            except ImportError:
                pass

    def update(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif self.enabled:
            end = "\n" if self.done == self.total else ""
            print(f"\rtq-ops eval: window {self.done}/{self.total}", end=end, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Tally:
    nll: float = 0.0
    top1: int = 0
    kl: list = field(default_factory=list)

    def add(self, logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor,
            rows: int = 256):
        """logits, reference (T, vocab) of the scored positions; targets (T,) token ids. In
        float64, `rows` positions at a time (a 262k vocabulary makes each (T, vocab) float64
        temporary 2 MB per position)."""
        for part in range(0, targets.shape[0], rows):
            cut = slice(part, part + rows)
            logp = torch.log_softmax(logits[cut].double(), -1)
            ref = torch.log_softmax(reference[cut].double(), -1)
            self.nll -= float(logp.gather(-1, targets[cut, None]).sum())
            self.top1 += int((logits[cut].argmax(-1) == reference[cut].argmax(-1)).sum())
            kl = (ref.exp() * (ref - logp)).sum(-1).clamp_min(0)
            self.kl.append(kl.cpu())


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, schemes: list[Scheme], max_length: int = 512,
             stride: int | None = None, group: int = 32, progress: bool = False) -> list[dict]:
    """Evaluate `schemes` on a causal LM over one token sequence.

    model: a transformers causal LM using attn_implementation "sdpa", in eval mode.
    ids: (n,) token ids on the model's device. stride defaults to max_length // 2.
    Returns one dict per scheme: scheme, method, k_bits, v_bits, key_quantizer, center_keys,
    scale_keys, window, sinks, edge_bits, center_values, split, k_bits_per_element,
    v_bits_per_element (of compressed tokens, mean over layers), bytes_per_token (K + V, all
    layers and KV heads), sequence_bytes (per sequence: the fp32 key means of "center", scales
    of "scale" and value means of "vcenter", the fp16 K and V of window and sink tokens, a bit
    per K and V channel naming the "split" part), bits_32k (bits per K/V element of a CONTEXT-token
    sequence, all of these included), perplexity,
    delta_ppl_pct (vs uncompressed), kl_mean and kl_p90 (nats), top1_agreement
    (fraction), tokens (scored).
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D token ids, got shape {tuple(ids.shape)}")
    if model.config._attn_implementation != "sdpa":
        raise ValueError("model must use attn_implementation='sdpa', got "
                         f"{model.config._attn_implementation!r}")
    checks.int_range("group", group, 1)
    stride = max_length // 2 if stride is None else stride
    layers, kv_heads, head_dim = kv_geometry(model.config)
    spans = list(windows(ids.numel(), max_length, stride))
    runners = {s: _runner(model, s, layers, group) for s in schemes if s.method != "uncompressed"}
    tallies = {s: _Tally() for s in schemes}
    bar = _Progress(len(spans), progress)
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        for begin, end, first in spans:
            window = ids[None, begin:end]
            keep = end - first + 1  # logits of positions first - 1 .. end - 1 (each predicts
            targets = ids[first:end]  # the next token), the last one unused
            reference = model(input_ids=window, use_cache=False,
                              logits_to_keep=keep).logits[0, :-1]
            for scheme, tally in tallies.items():
                logits = reference if scheme.method == "uncompressed" else (
                    runners[scheme](window, keep)[0, :-1])
                tally.add(logits, reference, targets)
            bar.update()
    bar.close()
    results = []
    for scheme, tally in tallies.items():
        kl = torch.cat(tally.kl)
        count = kl.numel()
        k_bpe, v_bpe = bits_per_element(scheme, head_dim, group, layers)
        elements = layers * kv_heads * head_dim  # of K (or of V) per token
        exact = scheme.window + scheme.sinks  # tokens kept in fp16 (K and V)
        means = scheme.center_keys + scheme.scale_keys + scheme.center_values  # fp32 vectors
        split = scheme.method == "tq" and scheme.split  # a bit per K and V channel: in the split
        sequence_bytes = elements * (4 * means + 4 * exact + split / 4)
        results.append({
            "scheme": scheme.name, "method": scheme.method, "k_bits": scheme.k_bits,
            "v_bits": scheme.v_bits,
            "key_quantizer": scheme.key_quantizer if scheme.method == "tq" else None,
            "center_keys": scheme.center_keys, "scale_keys": scheme.scale_keys,
            "k_bits_per_element": k_bpe, "v_bits_per_element": v_bpe,
            "bytes_per_token": layers * kv_heads * head_dim * (k_bpe + v_bpe) / 8,
            "sequence_bytes": sequence_bytes,
            "bits_32k": ((k_bpe + v_bpe) / 2 * (CONTEXT - exact) + 8 * sequence_bytes
                         / (2 * elements)) / CONTEXT,
            "window": scheme.window, "sinks": scheme.sinks, "edge_bits": scheme.edge_bits,
            "center_values": scheme.center_values, "split": scheme.split,
            "perplexity": math.exp(tally.nll / count), "kl_mean": float(kl.mean()),
            "kl_p90": float(torch.quantile(kl, 0.9)), "top1_agreement": tally.top1 / count,
            "tokens": count})
    base = next((r["perplexity"] for r in results if r["method"] == "uncompressed"), None)
    for r in results:
        r["delta_ppl_pct"] = None if base is None else 100 * (r["perplexity"] / base - 1)
    return results


def table(results: list[dict]) -> str:
    """The results as one Markdown table."""
    lines = ["| scheme | bits/element K / V | bits @32k | bytes/token | perplexity | Δ ppl | "
             "mean KL | p90 KL | top-1 agree |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        delta = "" if r["delta_ppl_pct"] is None else f"{r['delta_ppl_pct']:+.2f}%"
        lines.append(f"| {r['scheme']} | {r['k_bits_per_element']:.3g} / "
                     f"{r['v_bits_per_element']:.3g} | {r['bits_32k']:.3f} | "
                     f"{r['bytes_per_token']:,.0f} | "
                     f"{r['perplexity']:.3f} | {delta} | {r['kl_mean']:.4f} | "
                     f"{r['kl_p90']:.4f} | {100 * r['top1_agreement']:.1f}% |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install 'tq-ops[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(results: list[dict], path: str, title: str) -> None:
    """Mean KL and Δ perplexity against bytes per token, one marker series per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, marker in (("tq", "o"), ("rtn", "s"), ("kivi", "^")):
        rows = [r for r in results if r["method"] == method]
        for ax, key in zip(axes, ("kl_mean", "delta_ppl_pct")):
            ax.plot([r["bytes_per_token"] for r in rows], [r[key] for r in rows], marker,
                    label=method)
            for r in rows:
                ax.annotate(r["scheme"].split(" ", 1)[-1], (r["bytes_per_token"], r[key]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, label in zip(axes, ("mean next-token KL (nats)", "Δ perplexity (%)")):
        ax.set_xlabel("KV cache bytes per token (K + V, all layers)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- inputs

def random_llama(seed: int = 0):
    """A 2-layer Llama (head_dim 64, 4 query heads, 2 KV heads, vocab 512), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=4096, initializer_range=0.08,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def load(model_dir: str, text_file: str, dtype: torch.dtype):
    """(model, ids): a local checkpoint (offline) and its tokenization of a UTF-8 text file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype,
                                                 attn_implementation="sdpa").eval()
    with open(text_file, encoding="utf-8") as f:
        ids = tokenizer(f.read(), return_tensors="pt").input_ids[0]
    return model, ids


def parse_bits(text: str) -> list[tuple[int, int]]:
    """'4/4,4/3' -> [(4, 4), (4, 3)]."""
    try:
        pairs = [tuple(int(b) for b in item.split("/")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"--bits takes K/V pairs like 4/4,4/3, got {text!r}")
    return pairs


def _int_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 4,3, got {text!r}") from None


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv=None) -> int:
    """`tq-ops eval [options]`: print the table (and write --json / --plot)."""
    parser = argparse.ArgumentParser(prog="tq-ops eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local checkpoint directory (default: a random Llama)")
    parser.add_argument("--text", help="UTF-8 text file to score (needed with --model)")
    parser.add_argument("--tokens", type=int, help="score only the first N tokens")
    parser.add_argument("--max-length", type=int, default=512, help="window length (tokens)")
    parser.add_argument("--stride", type=int, help="window step (default max-length / 2)")
    parser.add_argument("--bits", type=parse_bits, help="K/V bit pairs (default 4/4,4/3,3/3)")
    parser.add_argument("--k-bits", type=_int_list, help="key bits list, paired with --v-bits")
    parser.add_argument("--v-bits", type=_int_list, help="value bits list")
    parser.add_argument("--key-quantizer", default="mse",
                        help="tq key quantizers, comma-separated: mse, prod or mse,prod")
    parser.add_argument("--levers", default="",
                        help="tq quality levers to show both off and on, comma-separated: "
                        "center, scale, edges, vcenter, split (default: one row per tq scheme, "
                        "levers at their defaults)")
    parser.add_argument("--fp-window", type=_int_list, default=[0],
                        help="tq rows with each of these full-precision windows of recent "
                        "tokens, comma-separated (0: none; simulated eagerly)")
    parser.add_argument("--sinks", type=int, default=0,
                        help="first tokens kept in full precision in the --fp-window rows")
    parser.add_argument("--no-baselines", action="store_true",
                        help="leave out the per-token RTN and KIVI-style rows")
    parser.add_argument("--group", type=int, default=32, help="KIVI key group size (tokens)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--plot", help="also draw KL and Δ perplexity vs bytes/token (PNG)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.bits and (args.k_bits or args.v_bits):
        parser.error("give either --bits or --k-bits/--v-bits")
    if args.k_bits or args.v_bits:
        k, v = args.k_bits or args.v_bits, args.v_bits or args.k_bits
        if len(k) != len(v):
            parser.error("--k-bits and --v-bits need the same number of entries")
        args.bits = list(zip(k, v))
    if args.plot:
        _pyplot()  # fail before the run, not after it
    key_quantizers = tuple(args.key_quantizer.split(","))
    if not set(key_quantizers) <= {"mse", "prod"}:
        parser.error(f"--key-quantizer takes mse, prod or mse,prod, got {args.key_quantizer!r}")
    levers = tuple(lever for lever in args.levers.split(",") if lever)
    if not set(levers) <= set(LEVERS):
        parser.error(f"--levers takes {', '.join(LEVERS)}, got {args.levers!r}")
    if args.model is None and args.text is not None:
        parser.error("--text needs --model")
    if args.model is None:
        model, name = random_llama(), "random Llama (2 layers, head_dim 64)"
        ids = torch.randint(512, (args.tokens or 1024,), generator=torch.Generator().manual_seed(0))
    elif args.text is None:
        parser.error("--model needs --text")
    else:
        model, ids = load(args.model, args.text, DTYPES[args.dtype])
        name = args.model
    ids = ids[:args.tokens] if args.tokens else ids
    model = model.to(args.device, DTYPES[args.dtype])
    schemes = default_schemes(args.bits or [(4, 4), (4, 3), (3, 3)], key_quantizers, levers,
                              baselines=not args.no_baselines, windows=args.fp_window,
                              sinks=args.sinks)
    results = evaluate(model, ids.to(args.device), schemes, args.max_length, args.stride,
                       args.group, progress=not args.no_progress)
    print(f"{name}: {results[0]['tokens']} tokens scored, windows of {args.max_length}, "
          f"{args.dtype}, {args.device}")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "max_length": args.max_length,
                       "stride": args.stride or args.max_length // 2, "group": args.group,
                       "dtype": args.dtype, "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot, name)
    return 0
