"""Every ```python block of README.md runs as written on the CPU, each in a fresh namespace,
with deprecation warnings (transformers raises FutureWarning for renamed arguments) as errors.

A block that cannot run on a CPU carries the marker line `# not run by tests/test_readme.py:
<reason>` and is skipped with that reason.
"""

import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARKER = "# not run by tests/test_readme.py:"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the first code line, code) of each ```python block of a markdown text."""
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1))
            for match in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M)]


def snippet_params(text: str) -> list:
    """One pytest.param(line, code) per block; a block with SKIP_MARKER is skipped."""
    params = []
    for line, code in python_blocks(text):
        marks = []
        if SKIP_MARKER in code:
            reason = code.split(SKIP_MARKER, 1)[1].splitlines()[0].strip()
            marks = [pytest.mark.skip(reason=reason or "no reason given")]
        params.append(pytest.param(line, code, id=f"README.md:{line}", marks=marks))
    return params


def test_blocks_are_found_with_their_lines_and_skip_markers():
    skipped = f"b = 2  {SKIP_MARKER} needs CUDA\nc = 3\n"
    text = f"intro\n```python\na = 1\n```\n```bash\nls\n```\n\n```python\n{skipped}```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (10, skipped)]
    first, second = snippet_params(text)
    assert first.values == (3, "a = 1\n") and not first.marks
    assert [mark.kwargs["reason"] for mark in second.marks] == ["needs CUDA"]
    assert len(python_blocks(README.read_text())) >= 3  # the Use, compile and cache snippets


@pytest.mark.parametrize("line,code", snippet_params(README.read_text()))
def test_readme_snippet_runs_as_written(line, code):
    padded = "\n" * (line - 1) + code  # tracebacks point at README.md's own line numbers
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        exec(compile(padded, str(README), "exec"), {"__name__": "__readme__"})
