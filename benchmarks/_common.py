"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_OPT = ROOT.parent / "shared" / "data" / "opt"


def best_time(fn, repeats):
    """``(seconds, output)``: the best of ``repeats`` timed calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def cuda_event_times(fn, repeats):
    """Milliseconds of each of ``repeats`` calls of ``fn`` between two Numba CUDA events, after a
    warm-up call (the GPU benchmarks' timer for refopt's kernels)."""
    from numba import cuda

    fn()
    cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = cuda.event(), cuda.event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(cuda.event_elapsed_time(a, b))
    return out


def torch_event_times(fn, repeats):
    """:func:`cuda_event_times` for a PyTorch peer: milliseconds between two ``torch.cuda`` events."""
    import torch

    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def write_random_checkpoint(path, layers=12, size="125m", tokenizer_files=False):
    """A random OPT checkpoint of a released shape (normal(0, 0.02) weights) in transformers' layout;
    with ``tokenizer_files`` and ../shared present, the real OPT vocabulary files beside it (read
    from ../shared, written only into ``path``, a temporary directory).  Returns the config."""
    from refopt.config import released_config
    from refopt.models import OPTBackbone

    cfg = released_config(size, num_layers=layers, dropout=0.0)
    OPTBackbone.from_opt_config(cfg).save_to_preset(path, format="huggingface")
    if tokenizer_files and (SHARED_OPT / "vocab.json").exists():
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(SHARED_OPT / name, Path(path) / name)
        (Path(path) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>", "eos_token": "</s>",
             "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True}))
    return cfg


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (``uptime``'s)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class BusyCore:
    """A competing process that keeps one core busy (a Python loop) while open."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
