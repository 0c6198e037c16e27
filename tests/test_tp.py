"""Tensor parallelism: transformers' own TP (tp_plan="auto") over 2 gloo processes, each rank
compiled with the backend in cache mode, generates the tokens and logits of one process, with
half the KV heads in each rank's cache. The ranks run `examples/tp_generate.py` as torchrun
would start it; this process computes the single-process run meanwhile."""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' tensor parallelism needs accelerate")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tp_generate.py"
WORLD, TOKENS = 2, 4
TIMEOUT_S = 300  # both ranks together; a hung rendezvous or collective fails the test here


def load_example():
    spec = importlib.util.spec_from_file_location("tp_generate", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(model_dir: Path, out_dir: Path) -> list[tuple[subprocess.Popen, Path]]:
    """WORLD processes of the example with torchrun's environment; output to rank<r>.log."""
    port = free_port()
    ranks = []
    for rank in range(WORLD):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1",
               "TORCHINDUCTOR_COMPILE_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        log = out_dir / f"rank{rank}.log"
        with open(log, "w") as out:
            command = [sys.executable, str(EXAMPLE), "--model", str(model_dir), "--tokens",
                       str(TOKENS), "--save", str(out_dir)]
            ranks.append((subprocess.Popen(command, env=env, stdout=out,
                                           stderr=subprocess.STDOUT), log))
    return ranks


def wait(ranks, deadline: float) -> None:
    """Every rank exited 0 before the deadline, else kill them all and fail with their logs."""
    failed = []
    for proc, log in ranks:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            pass
        if proc.returncode != 0:
            failed.append((proc, log))
    if failed:
        for proc, _ in ranks:
            proc.kill()
            proc.wait()
        tails = "\n".join(f"--- {log.name} (exit {proc.returncode}) ---\n"
                          + log.read_text()[-3000:] for proc, log in failed)
        pytest.fail(f"tensor-parallel ranks failed or exceeded {TIMEOUT_S} s:\n{tails}")


def test_tensor_parallel_generation_equals_one_process(tmp_path):
    example = load_example()
    model_dir = tmp_path / "model"
    example.save_tiny_llama(str(model_dir))
    deadline = time.monotonic() + TIMEOUT_S
    ranks = start_ranks(model_dir, tmp_path)
    try:
        model = example.load(str(model_dir), "cpu", torch.float32)
        with torch._inductor.config.patch(compile_threads=1):
            ids, logits, cache, compiler = example.generate(
                model, example.prompt(model.config.vocab_size, model.device), TOKENS, 4, 4)
    finally:
        wait(ranks, deadline)
    assert [layer.k_norms.shape[1] for layer in cache.layers] == [4, 4]
    assert [s.key_shape[1] for s in compiler.sites] == [4] * 4  # 2 layers, prefill and decode
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["kv_heads"] == [2, 2], (rank, got["kv_heads"])  # 4 KV heads over 2 ranks
        # the pass rewrote each rank's local attention (2 of the 4 KV heads) to read its cache
        assert [(source, shape[1]) for source, _, shape in got["sites"]] == [("cache", 2)] * 4
        assert torch.equal(got["ids"], ids), (rank, got["ids"], ids)
        error = (got["logits"] - logits).norm(dim=-1) / logits.norm(dim=-1)  # per step, row
        assert error.max() <= 2e-2, (rank, error)
