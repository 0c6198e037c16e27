"""Every parameter of every Triton kernel in tq_ops/kernels is read by its body.

A parameter the body never reads still costs each launcher an argument and each reader a
question (issue 19 removed five such from `_attention_kernel` and `_scores_kernel`). Checked
on the source's syntax tree: a name counts as read where the body loads it.
"""

import ast
import pathlib

import pytest

import tq_ops.kernels

KERNELS = pathlib.Path(tq_ops.kernels.__file__).parent


def jit_functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(
                "jit" in ast.unparse(decorator) for decorator in node.decorator_list):
            yield node


def unread_parameters(function: ast.FunctionDef) -> list[str]:
    loaded = {node.id for statement in function.body for node in ast.walk(statement)
              if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return [arg.arg for arg in function.args.args if arg.arg not in loaded]


def test_the_check_finds_an_unread_parameter():
    tree = ast.parse("@triton.jit\ndef k(x_ptr, S_W0: tl.constexpr):\n"
                     "    '''S_W0 in a docstring is not a read.'''\n    tl.load(x_ptr)\n")
    assert [unread_parameters(f) for f in jit_functions(tree)] == [["S_W0"]]


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_kernels_read_every_parameter(path):
    tree = ast.parse(path.read_text())
    unread = {f.name: unread_parameters(f) for f in jit_functions(tree)}
    assert not {name: params for name, params in unread.items() if params}


def test_the_readers_kernels_are_among_those_checked():
    names = {function.name for path in KERNELS.glob("*.py")
             for function in jit_functions(ast.parse(path.read_text()))}
    assert {"_attention_kernel", "_scores_kernel", "_merge_kernel"} <= names
