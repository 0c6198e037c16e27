"""The FX attention pass, the "turboquant" torch.compile backend and the Inductor hook pass.

`rewrite_attention(gm, config)` edits a Dynamo GraphModule in place: each attention site whose
K and V come from one `tq::read_cache` (a `TurboQuantCache`) or from `tq::decompress` becomes
one `tq::attention` on the packed fields; in "simulate" mode every other provable site gets
its K and V compressed with `tq::compress` and attends with `tq::attention`. Sites that cannot
be proven equivalent stay as they are and are logged (logger `tq_ops`) with the reason. The
pass never runs dead-code elimination over the graph (that would drop in-place cache
counters); it only erases the pure nodes its own replacement made dead.

A site is `softmax(scale * q.k + mask) @ v` as SDPA or as matmul / softmax / matmul, with or
without repeat_kv; below, `sdpa`. q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D).

Cache site (`_fuse_cache`), before and after:

    k_hat, v_hat = tq.read_cache(k_indices, k_norms, ..., v_indices, ..., written, dtype,
                                 k_exact, v_exact, exact_start, sinks)
    out = sdpa(q, k_hat, v_hat, mask, scale)
->
    kv_lens = aten.repeat(written, [B])                                  # (B,)
    start = aten.repeat(exact_start, [B])                                # (B,)
    out = tq.attention(q, k_indices, k_norms, ..., v_indices, ..., scale, is_causal, mask,
                       kv_lens, k_exact, v_exact, start, sinks)

kv_lens is set only where a mask hides the unwritten slots (a mask, K and V not cut with
[:, :, :L], both from the same read_cache), else None; a cache without sink or window tokens
passes no exact ones (None, None, None, 0), and one with them is rewritten only where kv_lens
is set. The read_cache node goes once unused.

Simulate site (`_simulate`, the graph's i-th simulated site; rot_k, cent_k, qjl_k, rot_v and
cent_v stand for new buffers `_tq_const_<i>_k_rotation`, ... holding its quantizer constants):

    out = sdpa(q, k, v, mask, scale)
->
    k0 = k - k.mean(-2, keepdim=True)                # with center_keys only; else k0 = k
    q, k0 = scale_key_channels(q, k0)     # with scale_keys only: q * s, k0 / s, s (B, Hkv, 1, D)
    kc = tq.compress(k0, rot_k, cent_k, qjl_k, k_index_bits, norm_dtype)
    vc = tq.compress(v, rot_v, cent_v, None, v_index_bits, norm_dtype)
    out = tq.attention(q, kc[0], kc[1], kc[2], kc[3], rot_k, cent_k, qjl_k, k_index_bits,
                       vc[0], vc[1], rot_v, cent_v, v_index_bits, scale, is_causal, mask, None)

With MSE keys qjl_k, kc[2] (signs) and kc[3] (residual norms) are passed as None. In both
rewrites a bool mask that marks hidden keys is negated first, and an output dtype other than
the site's gets a `.to(dtype)`.
"""

import logging
import operator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .. import checks
from ..codebook import MAX_DIM, MIN_DIM
from ..ops import attention_args
from ..packed import PackedKeys, PackedValues, named
from ..quantizer import (DEFAULT_CENTER_KEYS, DEFAULT_KEY_QUANTIZER, check_key_quantizer,
                         make_quantizers, scale_key_channels)
from . import patterns
from .patterns import Attention, Compressed, value_of

log = logging.getLogger("tq_ops")

MODES = ("simulate", "cache")
_CONSTANT_PREFIX = "_tq_const_"
SEED_RANGE = (-2 ** 63, 2 ** 63)  # leaves room for the site offsets below manual_seed's 2**64


@dataclass(frozen=True)
class TurboQuantConfig:
    """Settings of the pass.

    k_bits / v_bits: user bits per coordinate (Prod keys spend k_bits - 1 on MSE codes and one
    on QJL signs). key_quantizer: "mse" or "prod". mode: "simulate" compresses K and V of every
    attention call; "cache" only fuses `TurboQuantCache` reads into `tq::attention` (the
    quantizers are the cache's, so the other settings must keep their defaults). seed: an int
    in SEED_RANGE; site i of a graph uses seeds seed + 2i (keys) and seed + 2i + 1 (values).
    qjl_dim: QJL rows of "prod" keys (default head_dim). norm_dtype: dtype of the stored norms
    (float16, bfloat16 or float32). center_keys: subtract each (batch, kv head)'s key mean over
    the sequence before compressing (attention is unchanged by it: softmax is invariant to the
    q.mean added to every logit of a row), so the quantizer codes only the spread of the keys.
    scale_keys: divide each key channel by its scale over the sequence (`key_channel_scale`)
    before compressing and multiply the query by it (q.k = (q s).(k / s)), so channels of
    small spread keep resolution after the rotation.
    """

    k_bits: int = 4
    v_bits: int = 3
    key_quantizer: str = DEFAULT_KEY_QUANTIZER
    mode: str = "simulate"
    seed: int = 0
    qjl_dim: int | None = None
    norm_dtype: torch.dtype = torch.float16
    center_keys: bool = DEFAULT_CENTER_KEYS
    scale_keys: bool = False

    def __post_init__(self):
        check_key_quantizer(self.key_quantizer)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        checks.int_range("k_bits", self.k_bits, 1, 8)
        checks.int_range("v_bits", self.v_bits, 1, 8)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**63) (site seeds seed + 2i + 1 must fit "
                             f"torch.Generator.manual_seed), got {self.seed}")
        if self.qjl_dim is not None:
            checks.int_range("qjl_dim", self.qjl_dim, 1)
            if self.key_quantizer != "prod":
                raise ValueError("qjl_dim applies to key_quantizer='prod' only (MSE keys have no "
                                 "QJL rows)")
        if self.norm_dtype not in checks.NORM_DTYPES:
            raise TypeError(f"norm_dtype must be torch.float16, torch.bfloat16 or torch.float32, "
                            f"got {self.norm_dtype!r}")
        for name in ("center_keys", "scale_keys"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.mode == "cache":
            ignored = [f.name for f in fields(self) if getattr(self, f.name) != f.default
                       and f.name != "mode"]
            if ignored:
                raise ValueError(f"mode='cache' takes the quantizers of the TurboQuantCache, so "
                                 f"{', '.join(ignored)} would be ignored: set them on the cache")


@dataclass
class RewrittenSite:
    """One rewritten attention: the new `tq::attention` node, the matched form ("sdpa",
    "sdpa+repeat_kv", "matmul", "matmul+repeat_kv"), where K/V come from ("cache": packed
    TurboQuantCache buffers, "simulate": compressed on the fly), shapes (B, H, L, D) and user
    bits."""

    node: Node
    kind: str
    source: str
    query_shape: tuple
    key_shape: tuple
    value_shape: tuple
    k_bits: int
    v_bits: int
    key_quantizer: str

    def __str__(self) -> str:
        return (f"{self.node.name}: {self.kind} from {self.source}, q{self.query_shape} "
                f"k{self.key_shape} v{self.value_shape}, K{self.k_bits} ({self.key_quantizer}) "
                f"V{self.v_bits}")


def site_quantizers(config: TurboQuantConfig, index: int, k_dim: int, v_dim: int):
    """(key quantizer, value quantizer) modules of simulate-mode site `index` of a graph."""
    return make_quantizers(k_dim, config.k_bits, config.v_bits, config.key_quantizer,
                           config.seed + 2 * index, config.qjl_dim, config.norm_dtype,
                           v_head_dim=v_dim)


def _where(node: Node) -> str:
    stack = node.meta.get("nn_module_stack")
    path = list(stack.values())[-1][0] if stack else ""
    return f"{node.name} ({path})" if path else node.name


class _Builder:
    """Inserts nodes before `anchor`, giving each the fake value Dynamo would have recorded."""

    def __init__(self, gm: GraphModule, anchor: Node):
        self.gm, self.graph, self.anchor = gm, gm.graph, anchor
        fakes = [value_of(n) for n in anchor.all_input_nodes]
        self.fake_mode = next((v.fake_mode for v in fakes
                               if isinstance(v, torch._subclasses.FakeTensor)), None)

    def _fake(self, value):
        if (isinstance(value, torch.Tensor) and self.fake_mode is not None
                and not isinstance(value, torch._subclasses.FakeTensor)):
            return self.fake_mode.from_tensor(value, static_shapes=True)
        return value

    def call(self, target, *args) -> Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args)
        inputs = map_arg(args, lambda n: self._fake(value_of(n)))
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["example_value"] = target(*inputs)
        else:
            node.meta["example_value"] = target(*inputs)
        return node

    def constant(self, name: str, tensor: torch.Tensor) -> Node:
        self.gm.register_buffer(name, tensor, persistent=False)
        with self.graph.inserting_before(self.anchor):
            node = self.graph.get_attr(name)
        node.meta["example_value"] = self._fake(tensor)
        return node


_PURE_FUNCTIONS = {operator.getitem, operator.add, operator.mul, operator.truediv,
                   operator.matmul, torch.matmul, torch.mul, torch.div, torch.add, torch.softmax,
                   F.softmax, torch.transpose, torch.permute, torch.reshape, torch.unsqueeze,
                   torch.repeat_interleave, torch.masked_fill, torch.where, getattr,
                   *patterns.SDPA_TARGETS}
_PURE_METHODS = {"transpose", "permute", "reshape", "view", "expand", "unsqueeze", "contiguous",
                 "to", "type", "float", "half", "bfloat16", "repeat_interleave", "softmax",
                 "matmul", "__matmul__", "mul", "div", "add", "__add__", "__mul__",
                 "__truediv__", "masked_fill"}


def _erase_if_dead(graph: torch.fx.Graph, node: Node, also: set) -> None:
    """Erase `node` if unused and a known pure op (or in `also`), then its dead inputs."""
    if node._erased or node.users:
        return
    pure = (node in also
            or (node.op == "call_function" and (node.target in _PURE_FUNCTIONS or node.target in (
                torch.ops.tq.decompress.default, torch.ops.tq.decompress,
                torch.ops.tq.read_cache.default, torch.ops.tq.read_cache)))
            or (node.op == "call_method" and node.target in _PURE_METHODS))
    if not pure:
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for parent in inputs:
        _erase_if_dead(graph, parent, also)


def _packed(build: _Builder, source: Compressed) -> PackedKeys:
    """The source's packed tuple, its per-token fields cut to the first `length` tokens where
    the site reads only those."""
    if source.length is None:
        return source.packed
    full = slice(None, None, None)
    cut = (full, full, slice(None, source.length, None))
    tokens = {name: getattr(source.packed, name)
              for name in ("indices", "norms", "signs", "residual_norms")}
    return source.packed._replace(**{name: build.call(operator.getitem, node, cut)
                                     for name, node in tokens.items() if isinstance(node, Node)})


def _user_bits(source: Compressed) -> tuple[int, str]:
    prod = source.packed.qjl is not None
    return source.packed.index_bits + (1 if prod else 0), "prod" if prod else "mse"


@dataclass
class _Replacement:
    """A `tq::attention` node inserted for a site, and what the report says about it."""

    out: Node
    build: _Builder
    source: str
    k_bits: int
    v_bits: int
    key_quantizer: str
    dead: tuple = ()  # nodes that become unused besides the matched ones


def _mask(build: _Builder, site: Attention) -> Node | None:
    """The site's attn_mask in SDPA's convention (True or 0 = visible)."""
    if site.mask_hides:
        return build.call(torch.logical_not, site.attn_mask)
    return site.attn_mask


def _fuse_cache(gm: GraphModule, site: Attention) -> _Replacement | str:
    """tq::attention straight on the packed fields the two decompress nodes read."""
    ks, vs = site.key_source, site.value_source
    if vs.packed.qjl is not None or vs.packed.signs is not None:
        return "values carry QJL fields; tq::attention reads MSE values only"
    if ks.length != vs.length:
        return "key and value are cut to different lengths"
    build = _Builder(gm, site.output)
    keys = _packed(build, ks)
    values = named(PackedValues, _packed(build, vs)._asdict())
    kv_lens = exact = None  # stop at the written slots (the mask hides the rest anyway):
    # decode and prefill then cost the cache's fill, not its capacity
    batch = [value_of(keys.indices).shape[0]]
    if (site.attn_mask is not None and ks.length is None and ks.written is not None
            and ks.decompress is vs.decompress):
        kv_lens = build.call(torch.ops.aten.repeat.default, ks.written, batch)
        if ks.exact is not None:
            exact = ks.exact._replace(start=build.call(torch.ops.aten.repeat.default,
                                                       ks.exact.start, batch))
    elif ks.exact is not None or vs.exact is not None:
        return ("the cache keeps exact sink/window tokens, which tq::attention places by the "
                "written length: needs a mask, K and V uncut, from one read_cache")
    out = build.call(torch.ops.tq.attention.default, *attention_args(
        site.query, keys, values, site.scale, site.is_causal, _mask(build, site), kv_lens,
        exact))
    k_bits, key_quantizer = _user_bits(ks)
    return _Replacement(out, build, "cache", k_bits, _user_bits(vs)[0], key_quantizer,
                        (ks.decompress, vs.decompress))


def _simulate(gm: GraphModule, site: Attention, config: TurboQuantConfig,
              index: int) -> _Replacement:
    """tq::compress of K and V, then tq::attention on the compressed form."""
    build = _Builder(gm, site.output)
    k_dim, v_dim = value_of(site.key).shape[-1], value_of(site.value).shape[-1]
    device = value_of(site.query).device
    kq, vq = site_quantizers(config, index, k_dim, v_dim)
    kq, vq = kq.to(device), vq.to(device)

    def const(name, tensor):
        return None if tensor is None else build.constant(f"{_CONSTANT_PREFIX}{index}_{name}",
                                                          tensor)

    k_rot, k_cent = const("k_rotation", kq.rotation), const("k_centroids", kq.centroids)
    k_qjl = const("k_qjl", kq.qjl)
    v_rot, v_cent = const("v_rotation", vq.rotation), const("v_centroids", vq.centroids)
    key, query = site.key, site.query
    if config.center_keys:  # (B, Hkv, S, D) minus its (B, Hkv, 1, D) mean over S
        key = build.call(torch.sub, key, build.call(torch.mean, key, -2, True))
    if config.scale_keys:  # q * s and k / s, s (B, Hkv, 1, D) repeated over each GQA group
        scaled = build.call(scale_key_channels, query, key)
        query, key = (build.call(operator.getitem, scaled, i) for i in (0, 1))
    kc = build.call(torch.ops.tq.compress.default, key, k_rot, k_cent, k_qjl, kq.index_bits,
                    config.norm_dtype)
    vc = build.call(torch.ops.tq.compress.default, site.value, v_rot, v_cent, None,
                    vq.index_bits, config.norm_dtype)
    k_fields = [build.call(operator.getitem, kc, i) for i in range(4 if kq.qjl is not None else 2)]
    k_fields += [None] * (4 - len(k_fields))
    keys = PackedKeys(*k_fields, k_rot, k_cent, k_qjl, kq.index_bits)
    values = PackedValues(*[build.call(operator.getitem, vc, i) for i in range(2)], v_rot, v_cent,
                          vq.index_bits)
    out = build.call(torch.ops.tq.attention.default, *attention_args(
        query, keys, values, site.scale, site.is_causal, _mask(build, site)))
    return _Replacement(out, build, "simulate", config.k_bits, config.v_bits,
                        config.key_quantizer)


def rewrite_attention(gm: GraphModule, config: TurboQuantConfig | None = None, *,
                      constants: bool = True) -> list[RewrittenSite]:
    """Replace the attention sites of a Dynamo GraphModule with `tq::` ops, in place.

    Returns the rewritten sites in graph order. `constants=False` (Inductor hook use, where new
    tensors cannot be added to the graph) limits the pass to TurboQuantCache sites.
    """
    config = config or TurboQuantConfig()
    graph = gm.graph
    sites: list[RewrittenSite] = []
    simulated = 0
    for node in list(graph.nodes):
        if node._erased:
            continue  # erased by an earlier rewrite
        site = patterns.match(node)
        if site is None:
            continue
        if isinstance(site, str):
            log.warning("tq_ops: attention at %s left unchanged: %s", _where(node), site)
            continue
        if site.key_source is not None and site.value_source is not None:
            new = _fuse_cache(gm, site)
            if isinstance(new, str):
                log.warning("tq_ops: cache attention at %s left unchanged: %s", _where(node), new)
                continue
        elif config.mode == "cache":
            log.info("tq_ops: attention at %s does not read a TurboQuantCache; left unchanged "
                     "(mode='cache')", _where(node))
            continue
        elif not constants:
            log.warning("tq_ops: attention at %s left unchanged: simulate mode needs new "
                        "constant tensors, which an Inductor hook cannot add; use "
                        "backend='turboquant'", _where(node))
            continue
        else:
            dims = (value_of(site.key).shape[-1], value_of(site.value).shape[-1])
            if not all(MIN_DIM <= d <= MAX_DIM for d in dims):
                log.warning("tq_ops: attention at %s left unchanged: key/value head_dim %s "
                            "outside the quantizers' [%d, %d]", _where(node), dims, MIN_DIM,
                            MAX_DIM)
                continue
            new = _simulate(gm, site, config, simulated)
            simulated += 1
        result = new.out
        if value_of(new.out).dtype != value_of(site.output).dtype:
            result = new.build.call(torch.Tensor.to, new.out, value_of(site.output).dtype)
        site.output.replace_all_uses_with(result)
        also = set(site.replaced)
        for dead in site.replaced + list(new.dead):
            _erase_if_dead(graph, dead, also)
        found = RewrittenSite(new.out, site.kind, new.source, tuple(value_of(site.query).shape),
                              tuple(value_of(site.key).shape),
                              tuple(value_of(site.value).shape), new.k_bits, new.v_bits,
                              new.key_quantizer)
        log.info("tq_ops: rewrote attention at %s -> %s", _where(node), found)
        sites.append(found)
    if sites:
        graph.lint()
        gm.recompile()
    return sites


def _clone_dynamo_module(gm: GraphModule) -> GraphModule:
    """A copy of a Dynamo GraphModule that AOTAutograd still recognises as Dynamo's (Dynamo keeps
    reading the original's placeholders after the backend returns)."""
    graph = torch.fx.Graph()
    mapping: dict = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    for old, new in mapping.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    clone = GraphModule(gm, graph, gm.__class__.__name__)
    clone.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        clone._param_name_to_source = gm._param_name_to_source
    return clone


def _lift_constants(gm: GraphModule) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Turn the pass's get_attr constants into trailing graph inputs (AOTAutograd accepts no new
    module state). Returns the tensors to append to every call and their static-shape fake
    tensors, the example inputs to compile with: fakified afresh under `dynamic=True`, a
    constant's sizes would be duck-sized onto the symbol of an equal data size (a first
    sequence length of 16 = head_dim), specialising that size and recompiling at the next."""
    graph = gm.graph
    last = list(graph.find_nodes(op="placeholder"))[-1]
    lifted, examples = [], []
    for node in list(graph.find_nodes(op="get_attr")):
        if not node.target.startswith(_CONSTANT_PREFIX):
            continue
        with graph.inserting_after(last):
            placeholder = graph.placeholder(node.target)
        placeholder._dynamo_source = None
        placeholder.meta.update(node.meta)
        placeholder.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
        lifted.append(getattr(gm, node.target))
        examples.append(value_of(placeholder))
        delattr(gm, node.target)
        last = placeholder
    gm.recompile()
    return lifted, examples


class TurboQuantBackend:
    """torch.compile backend: rewrite attention in the Dynamo graph, then compile with Inductor.

    Accepts torch.compile's `mode=` / `options=` (passed on to Inductor, e.g.
    mode="reduce-overhead" for CUDA graphs). `sites` collects the rewritten sites of every
    graph compiled so far.
    """

    def __init__(self, config: TurboQuantConfig | None = None):
        self.config = config or TurboQuantConfig()
        self.sites: list[RewrittenSite] = []

    def __call__(self, gm: GraphModule, example_inputs, mode: str | None = None,
                 options: dict | None = None):
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(mode)) if mode else {}
        patches.update(options or {})
        rewritten = _clone_dynamo_module(gm)
        sites = rewrite_attention(rewritten, self.config)
        self.sites.extend(sites)
        if not sites:
            return compile_fx(gm, example_inputs, config_patches=patches)
        lifted, examples = _lift_constants(rewritten)
        compiled = compile_fx(rewritten, list(example_inputs) + examples, config_patches=patches)
        if not lifted:
            return compiled

        def run(*args):
            return compiled(*args, *lifted)

        return run


class TurboQuantPass(CustomGraphPass):
    """The pass as an Inductor `pre_grad_custom_pass` (for users of the default backend):

        torch.compile(model, options={"pre_grad_custom_pass": TurboQuantPass()})

    Hooks cannot add constant tensors, so only TurboQuantCache sites are rewritten here.
    """

    def __init__(self, config: TurboQuantConfig | None = None):
        self.config = config or TurboQuantConfig(mode="cache")
        self.sites: list[RewrittenSite] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.sites.extend(rewrite_attention(graph.owning_module, self.config, constants=False))

    def uuid(self):
        return (get_hash_for_files((__file__, patterns.__file__)), repr(self.config))


def backend(k_bits: int = 4, v_bits: int = 3, key_quantizer: str = DEFAULT_KEY_QUANTIZER,
            mode: str = "simulate", seed: int = 0, qjl_dim: int | None = None,
            norm_dtype: torch.dtype = torch.float16,
            center_keys: bool = DEFAULT_CENTER_KEYS,
            scale_keys: bool = False) -> TurboQuantBackend:
    """A "turboquant" backend with explicit settings: `torch.compile(m, backend=backend(...))`."""
    return TurboQuantBackend(TurboQuantConfig(k_bits, v_bits, key_quantizer, mode, seed, qjl_dim,
                                              norm_dtype, center_keys, scale_keys))
