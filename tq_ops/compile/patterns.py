"""Recognise attention in a Dynamo (pre-grad, torch IR) FX graph.

Each matcher takes the node that produces the attention output and returns either an
`Attention` (what the site computes, with the proof obligations checked) or a string saying
why the site cannot be proven equivalent to `softmax(scale * q.k + mask) @ v`. Nothing here
edits the graph. Shapes and dtypes come from the Dynamo metadata (`node.meta["example_value"]`,
fake tensors).
"""

import inspect
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..packed import ExactTokens, PackedKeys, named

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Compressed:
    """The packed fields behind a decompressed K or V, optionally cut to the first `length`
    tokens (a `[:, :, :length]` slice). `decompress` is the node that decoded them: a
    `tq::decompress`, or the `tq::read_cache` of a TurboQuantCache, whose `written` (0-d count
    of filled slots) is then set, and `exact` where the cache keeps sink or window tokens."""

    decompress: Node
    packed: PackedKeys  # of nodes and constants; values from a read_cache have no QJL fields
    length: int | None = None
    written: Node | None = None
    exact: ExactTokens | None = None  # of nodes (start 0-d) and the sink count


@dataclass
class Attention:
    """One attention site: output = softmax(scale * q.k^T + mask) @ v over (B, H, L, D).

    `key`/`value` are the tensors before any repeat-the-KV-heads step (query head h reads
    kv head h // (Hq // Hkv)); `key_source`/`value_source` are set when they are the
    output of `tq::decompress` or of a `tq::read_cache` (a TurboQuantCache).
    """

    kind: str
    output: Node
    query: Node
    key: Node
    value: Node
    attn_mask: Node | None
    scale: float
    is_causal: bool
    mask_hides: bool = False  # a bool attn_mask marks hidden keys (masked_fill), not visible ones
    key_source: Compressed | None = None
    value_source: Compressed | None = None
    replaced: list = field(default_factory=list)  # nodes the rewrite makes dead, output first


def value_of(node):
    """The fake tensor (or number) Dynamo recorded for `node`, or None."""
    if not isinstance(node, Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def _same(a, b) -> bool:
    """a == b provably (ints or SymInts), without adding a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def _shape(node) -> tuple | None:
    val = value_of(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _float_4d(node) -> bool:
    val = value_of(node)
    return isinstance(val, torch.Tensor) and val.dim() == 4 and val.dtype in _FLOAT


def _is_method(node, *names) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


def _is_function(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _arg(node: Node, index: int, name: str, default=None):
    """Argument `name` of a call, given positionally at `index` (counting self) or by keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _binary(node: Node) -> tuple | None:
    """(input, other) of a call with just these two arguments, positional or by keyword."""
    if len(node.args) > 2 or set(node.kwargs) - {"input", "other"}:
        return None
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    return None if a is None or b is None else (a, b)


def _number(value) -> float | None:
    """A Python number, or a 0-d constant node (`torch.full([], c)`, `torch.tensor(c)`)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if _is_function(value, torch.full) and not value.kwargs.get("requires_grad", False):
        size, fill = _arg(value, 0, "size"), _arg(value, 1, "fill_value")
        if tuple(size) == () and isinstance(fill, (int, float)):
            return float(fill)
    if _is_function(value, torch.tensor) and isinstance(_arg(value, 0, "data"), (int, float)):
        return float(_arg(value, 0, "data"))
    return None


def _dim(node) -> int | None:
    shape = _shape(node)
    return None if shape is None else len(shape)


def _is_last_two_transpose(node) -> bool:
    """x.transpose(-2, -1) (any dim spelling), x.permute(0, 1, 3, 2) or x.mT of a 4-D x."""
    if _is_function(node, getattr) and node.args[1:] == ("mT",):
        return _dim(node.args[0]) == 4
    if _is_method(node, "transpose") or _is_function(node, torch.transpose):
        dims = (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
        return (_dim(_arg(node, 0, "input")) == 4 and all(isinstance(d, int) for d in dims)
                and {d % 4 for d in dims} == {2, 3})
    if _is_method(node, "permute") or _is_function(node, torch.permute):
        order = _arg(node, 1, "dims") if len(node.args) <= 2 else node.args[1:]
        return (_dim(_arg(node, 0, "input")) == 4 and isinstance(order, (tuple, list))
                and all(isinstance(d, int) for d in order)
                and tuple(d % 4 for d in order) == (0, 1, 3, 2))
    return False


def strip_repeat_kv(node: Node) -> tuple[Node, int, list]:
    """(x, n_rep, nodes) when `node` repeats each head of x (B, Hkv, S, D) n_rep times in place,
    head h of the result being head h // n_rep of x; (node, 1, []) otherwise.

    Recognises x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D) (also with
    unsqueeze(2) and view) and x.repeat_interleave(n, dim=1).
    """
    if _is_method(node, "repeat_interleave") or _is_function(node, torch.repeat_interleave):
        base, reps = _arg(node, 0, "input"), _arg(node, 1, "repeats")
        dim = _arg(node, 2, "dim")
        if isinstance(reps, int) and dim is not None and _dim(base) == 4 and dim % 4 == 1:
            return base, reps, [node]
        return node, 1, []
    if not (_is_method(node, "reshape", "view") or _is_function(node, torch.reshape)):
        return node, 1, []
    expand = _arg(node, 0, "input")
    if not _is_method(expand, "expand"):
        return node, 1, []
    inserted = expand.args[0]
    if _is_method(inserted, "unsqueeze") or _is_function(inserted, torch.unsqueeze):
        base = _arg(inserted, 0, "input")
        ok = _dim(base) == 4 and _arg(inserted, 1, "dim") in (2, -3)
    elif _is_function(inserted, operator.getitem) and isinstance(inserted.args[1], tuple):
        base, index = inserted.args
        full = slice(None, None, None)
        ok = _dim(base) == 4 and index in ((full, full, None), (full, full, None, full),
                                           (full, full, None, full, full))
    else:
        return node, 1, []
    if not ok:
        return node, 1, []
    b, h, s, d = _shape(base)
    eb, eh, n, es, ed = _shape(expand)
    rb, rh, rs, rd = _shape(node) if _dim(node) == 4 else (None,) * 4
    if not (isinstance(n, int) and all(_same(x, y) for x, y in
                                       ((b, eb), (h, eh), (s, es), (d, ed), (b, rb), (s, rs),
                                        (d, rd), (h * n, rh)))):
        return node, 1, []
    return base, n, [node, expand, inserted]


def _arguments(node: Node, op) -> dict:
    """The arguments by name of `node`, a call of `op` (a `torch.ops.tq` packet)."""
    names = [a.name for a in op.default._schema.arguments]
    return dict(zip(names, node.args), **node.kwargs)


def _read_cache_source(node: Node, which: int, length: int | None) -> Compressed:
    """Output `which` (0 keys, 1 values) of a `tq::read_cache` node, as `PackedKeys`."""
    args = _arguments(node, torch.ops.tq.read_cache)
    exact = named(ExactTokens, args, "exact_")._replace(sinks=args.get("exact_sinks", 0))
    return Compressed(node, named(PackedKeys, args, "k_" if which == 0 else "v_"), length,
                      args["written"], None if exact.keys is None else exact)


def compressed_source(node: Node) -> Compressed | None:
    """The `tq::decompress` (or one output of a `tq::read_cache`) that `node` is, possibly
    `.contiguous()` or cut to the first L tokens with [:, :, :L], else None."""
    length = None
    while _is_method(node, "contiguous"):
        node = node.args[0]
    if _is_function(node, operator.getitem) and isinstance(node.args[1], tuple):
        full = slice(None, None, None)
        index = node.args[1]
        if index[:2] != (full, full) or len(index) not in (3, 4) or index[3:] not in ((), (full,)):
            return None
        cut = index[2]
        if not (isinstance(cut, slice) and cut.start in (None, 0) and cut.step in (None, 1)
                and isinstance(cut.stop, int)):
            return None
        length, node = cut.stop, node.args[0]
    read_cache = torch.ops.tq.read_cache
    if (_is_function(node, operator.getitem) and node.args[1] in (0, 1)
            and _is_function(node.args[0], read_cache.default, read_cache)):
        return _read_cache_source(node.args[0], node.args[1], length)
    decompress = torch.ops.tq.decompress
    if not _is_function(node, decompress.default, decompress):
        return None
    return Compressed(node, named(PackedKeys, _arguments(node, decompress)), length)


_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul,
                       operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
                       operator.imatmul, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift}
_IN_PLACE_DUNDERS = {f"__{op.__name__}__" for op in _IN_PLACE_OPERATORS}


def _schema_writes(schema: torch.FunctionSchema, node: Node) -> bool:
    """True if `node`, a call of an op with `schema`, may write one of its arguments: the schema
    marks an argument written (alias info `is_write`) that is positional or passed by keyword."""
    return any(a.alias_info is not None and a.alias_info.is_write
               and (not a.kwarg_only or a.name in node.kwargs) for a in schema.arguments)


def _writes_by_flag(node: Node) -> bool:
    """True if a Python-level call writes through `out=` or `inplace=True` (by keyword, or
    positionally where the target has a Python signature, as `F.relu(x, True)`)."""
    if node.kwargs.get("out") is not None:
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # a builtin without a signature, or not bindable
        return node.kwargs.get("inplace", False) is not False
    return bound.arguments.get("inplace", False) is not False


def _mutates(node: Node) -> bool:
    """True if `node` may write into a tensor in place: x.add_(...), x[i] = y, x += y,
    torch.mul(x, 4, out=x), F.relu(x, inplace=True), an op whose schema writes an argument."""
    if node.op == "call_method":
        name = node.target
        return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS
    if node.op != "call_function":
        return False
    target = node.target
    if target in _IN_PLACE_OPERATORS:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return _schema_writes(target._schema, node)
    if isinstance(target, torch._ops.OpOverloadPacket):  # any overload the call may resolve to
        return any(_schema_writes(getattr(target, name)._schema, node)
                   for name in target.overloads())
    name = getattr(target, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or _writes_by_flag(node)


def _mutation_before(output: Node, nodes: list) -> Node | None:
    """An in-place op that runs after the earliest of `nodes` and before `output`: the rewrite
    reads the site's inputs at `output`, the original read some of them earlier."""
    pending = set(nodes) - {output}
    node = output.prev
    while pending and node.op != "root":
        if node not in pending and _mutates(node):
            return node
        pending.discard(node)
        node = node.prev
    return None


def _finish(site: Attention, q_heads, k_heads, v_heads) -> Attention | str:
    """Shared proof obligations on the heads and the causal convention; sets the sources."""
    if any(getattr(value_of(x), "requires_grad", False) for x in
           (site.query, site.key, site.value, site.attn_mask)):
        return "inputs require grad (the tq:: ops have no backward; run under torch.no_grad())"
    batches = [_shape(x)[0] for x in (site.query, site.key, site.value)]
    if not (_same(batches[0], batches[1]) and _same(batches[1], batches[2])):
        return f"query, key and value batch sizes {batches} differ (broadcast batch)"
    head_dims = [_shape(x)[3] for x in (site.query, site.key, site.value)]
    if not all(isinstance(d, int) for d in head_dims):
        return f"head_dim is not static: {head_dims}"
    if not _same(k_heads, v_heads):
        return "key and value have different head counts after removing repeat-KV"
    if not (isinstance(q_heads, int) and isinstance(k_heads, int) and q_heads % k_heads == 0):
        return f"query heads {q_heads} are not a static multiple of key/value heads {k_heads}"
    q_len, k_len = _shape(site.query)[2], _shape(site.key)[2]
    if site.is_causal and not _same(q_len, k_len):
        return (f"is_causal with q_len {q_len} != kv_len {k_len}: SDPA aligns the causal mask "
                "top-left, tq::attention bottom-right")
    if site.attn_mask is not None:
        mask = value_of(site.attn_mask)
        if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.bool,) + _FLOAT:
            return "attn_mask is not a bool or floating tensor"
        full = (_shape(site.query)[0], q_heads, q_len, k_len)
        if mask.dim() > 4 or not all(_same(m, 1) or _same(m, f) for m, f in
                                     zip(reversed(mask.shape), reversed(full))):
            return f"attn_mask of shape {tuple(mask.shape)} does not broadcast to {full}"
    site.key_source = compressed_source(site.key)
    site.value_source = compressed_source(site.value)
    sources = [s.decompress for s in (site.key_source, site.value_source) if s is not None]
    mutation = _mutation_before(site.output, site.replaced + sources)
    if mutation is not None:
        return (f"in-place {mutation.name} runs inside the attention (between reading its "
                "inputs and its output)")
    return site


def match_sdpa(node: Node) -> Attention | str | None:
    """A scaled_dot_product_attention call (any argument form); None if `node` is not SDPA."""
    if not _is_function(node, *SDPA_TARGETS):
        return None
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    if set(args) - set(_SDPA_PARAMS):
        return f"unknown SDPA arguments {sorted(set(args) - set(_SDPA_PARAMS))}"
    dropout = args["dropout_p"]
    if not isinstance(dropout, (int, float)) or dropout != 0:
        return f"dropout_p={dropout!r} is not a constant 0"
    for name in ("is_causal", "enable_gqa"):
        if not isinstance(args[name], bool):
            return f"{name} is not a constant bool"
    if args["scale"] is not None and _number(args["scale"]) is None:
        return "scale is not a constant"
    if args["is_causal"] and args["attn_mask"] is not None:
        return "both attn_mask and is_causal are set"
    q, k, v = args["query"], args["key"], args["value"]
    if not all(_float_4d(x) for x in (q, k, v)):
        return "query, key and value are not all 4-D floating tensors"
    k_base, k_rep, k_nodes = strip_repeat_kv(k)
    v_base, v_rep, v_nodes = strip_repeat_kv(v)
    if k_rep != v_rep:
        return f"key repeated {k_rep}x but value {v_rep}x"
    q_shape, k_shape = _shape(q), _shape(k_base)
    if not isinstance(q_shape[3], int):
        return "head_dim is not static"
    if not args["enable_gqa"] and not _same(q_shape[1], _shape(k)[1]):
        return "query and key head counts differ without enable_gqa"
    scale = (1 / math.sqrt(q_shape[3]) if args["scale"] is None else _number(args["scale"]))
    kind = "sdpa+repeat_kv" if k_rep > 1 else "sdpa"
    site = Attention(kind, node, q, k_base, v_base, args["attn_mask"], scale, args["is_causal"],
                     replaced=[node] + k_nodes + v_nodes)
    return _finish(site, q_shape[1], k_shape[1], _shape(v_base)[1])


def _is_matmul(node) -> bool:
    return (_is_function(node, torch.matmul, operator.matmul)
            or _is_method(node, "matmul", "__matmul__"))


def _skip_casts_and_identity(node: Node, chain: list) -> Node:
    """Walk up through dtype casts and inactive dropout, recording the nodes in `chain`."""
    while True:
        if _is_method(node, "to", "type") and len(node.args) == 2 and not node.kwargs:
            ok = node.args[1] in _FLOAT
        elif _is_method(node, "to") and len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
            ok = node.kwargs["dtype"] in _FLOAT
        elif _is_method(node, *_CAST_METHODS) and len(node.args) == 1:
            ok = True
        elif _is_function(node, F.dropout, torch.dropout):
            p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "train" if node.target is
                                                          torch.dropout else "training", True)
            ok = training is False or p == 0
        else:
            return node
        if not ok:
            return node
        chain.append(node)
        node = _arg(node, 0, "input")


def _softmax_dim(node) -> int | None:
    if _is_function(node, F.softmax, torch.softmax) or _is_method(node, "softmax"):
        return _arg(node, 1, "dim")
    return None


def match_matmul(node: Node) -> Attention | str | None:
    """matmul(softmax(scale * (q @ k^T) + mask), v) with optional casts and inactive dropout
    between the steps. None if `node` is not a matmul fed by a softmax."""
    operands = _binary(node) if _is_matmul(node) else None
    if operands is None:
        return None
    chain = [node]
    probs, v = operands
    probs = _skip_casts_and_identity(probs, chain)
    dim = _softmax_dim(probs)
    if dim is None:
        before = [_skip_casts_and_identity(n, []) for n in getattr(probs, "all_input_nodes", ())]
        if (not _is_matmul(probs) and any(_softmax_dim(n) is not None for n in before)
                and all(_float_4d(x) for x in (probs, v))):
            return (f"{probs.name} between the softmax and the value matmul is neither a cast "
                    "nor an inactive dropout")
        return None
    if not all(_float_4d(x) for x in (probs, v)):
        return "softmax or value is not a 4-D floating tensor"
    if dim % 4 != 3:
        return f"softmax over dim {dim}, not the key dimension"
    chain.append(probs)
    x = _skip_casts_and_identity(_arg(probs, 0, "input"), chain)
    mask, scale, hides = None, 1.0, False
    fill = _fill_mask(x)
    if isinstance(fill, str):
        return fill
    if fill is not None:
        chain.append(x)
        scores, mask, hides = fill
        x = _skip_casts_and_identity(scores, chain)
    elif _is_function(x, operator.add, torch.add) or _is_method(x, "add", "__add__"):
        operands = _binary(x)
        if operands is None:
            return "mask addition has an alpha"
        left, right = operands
        scores, mask = (left, right) if _is_scores(left) else (right, left)
        if not (isinstance(value_of(mask), torch.Tensor) and value_of(mask).dtype in _FLOAT):
            return "added term is not a floating mask tensor"
        chain.append(x)
        x = _skip_casts_and_identity(scores, chain)
    while (_is_function(x, operator.mul, operator.truediv, torch.mul, torch.div)
           or _is_method(x, "mul", "div", "__mul__", "__truediv__")):
        divide = x.target in (operator.truediv, torch.div, "div", "__truediv__")
        operands = _binary(x)
        if operands is None:
            return "scaling has extra arguments (rounding mode?)"
        left, right = operands
        factor, scores = (_number(right), left)
        if factor is None and not divide:
            factor, scores = _number(left), right
        if factor is None or factor == 0:
            return "attention logits are scaled by a non-constant"
        scale *= 1 / factor if divide else factor
        chain.append(x)
        x = _skip_casts_and_identity(scores, chain)
    operands = _binary(x) if _is_matmul(x) else None
    if operands is None or not _is_last_two_transpose(operands[1]):
        return "softmax input is not (scaled, masked) q @ k.transpose(-2, -1)"
    chain.append(x)
    for inner in chain[1:]:
        if len(inner.users) != 1:
            return f"intermediate {inner.name} is also used elsewhere (attention weights escape)"
    q, key_t = operands
    k = _arg(key_t, 0, "input")
    if not all(_float_4d(t) for t in (q, k)):
        return "query and key are not 4-D floating tensors"
    k_base, k_rep, k_nodes = strip_repeat_kv(k)
    v_base, v_rep, v_nodes = strip_repeat_kv(v)
    if k_rep != v_rep:
        return f"key repeated {k_rep}x but value {v_rep}x"
    if not _same(_shape(q)[1], _shape(k)[1]):
        return "query and key head counts differ"
    replaced = chain + ([key_t] if len(key_t.users) == 1 else []) + k_nodes + v_nodes
    site = Attention("matmul" if k_rep == 1 else "matmul+repeat_kv", node, q, k_base, v_base,
                     mask, scale, False, mask_hides=hides, replaced=replaced)
    return _finish(site, _shape(q)[1], _shape(k_base)[1], _shape(v_base)[1])


def _fill_mask(node) -> tuple | str | None:
    """(scores, mask, mask_hides) of scores.masked_fill(mask, -inf) (True hides a key) or
    torch.where(mask, scores, -inf) (True keeps it; either order), a reason the fill cannot be
    rewritten, or None if `node` is neither."""
    if _is_method(node, "masked_fill") or _is_function(node, torch.masked_fill):
        scores, mask, fill = (_arg(node, 0, "input"), _arg(node, 1, "mask"),
                              _arg(node, 2, "value"))
        hides = True
    elif _is_function(node, torch.where) and len(node.args) + len(node.kwargs) == 3:
        mask, scores, fill = (_arg(node, 0, "condition"), _arg(node, 1, "input"),
                              _arg(node, 2, "other"))
        hides = _number(scores) is not None
        if hides:
            scores, fill = fill, scores
    else:
        return None
    if not (isinstance(value_of(mask), torch.Tensor) and value_of(mask).dtype == torch.bool
            and isinstance(scores, Node)):
        return f"{node.name} does not fill the logits under a bool mask"
    if _number(fill) != -math.inf:
        return (f"{node.name} fills hidden logits with {fill!r}, not -inf (rows that hide every "
                "key would differ)")
    return scores, mask, hides


def _is_scores(node) -> bool:
    """True if `node` (through casts and scalings) is a matmul: the logits side of `+ mask`."""
    chain: list = []
    while True:
        node = _skip_casts_and_identity(node, chain)
        if (_is_function(node, operator.mul, operator.truediv, torch.mul, torch.div)
                or _is_method(node, "mul", "div", "__mul__", "__truediv__")):
            operands = _binary(node)
            if operands is None:
                return False
            left, right = operands
            node = left if isinstance(left, Node) and _number(left) is None else right
            continue
        return _is_matmul(node)


def match_unsupported(node: Node) -> str | None:
    """A reason when `node` is an einsum or bmm of softmax output (the value product of an
    attention written in a form the pass does not match), else None."""
    if not (_is_function(node, torch.einsum, torch.bmm) or _is_method(node, "bmm")):
        return None
    if any(_softmax_dim(_skip_casts_and_identity(n, [])) is not None for n in node.all_input_nodes):
        return ("einsum/bmm attention is not matched (write it with torch.matmul or "
                "F.scaled_dot_product_attention)")
    return None


def match(node: Node) -> Attention | str | None:
    """Attention site ending at `node`, a reason it is not rewritable, or None (not attention)."""
    for matcher in (match_sdpa, match_matmul, match_unsupported):
        found = matcher(node)
        if found is not None:
            return found
    return None
