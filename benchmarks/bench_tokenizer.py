"""Tokenizer throughput: refopt vs tiktoken vs ``tokenizers`` on the same GPT-2 vocabulary.

    python -m benchmarks.bench_tokenizer [--repeat 5] [--corpus PATH] [--no-train]

Encodes ``../shared/data/corpus/tinyshakespeare.txt`` as one string and line by line (one call
per line, each library's single-text API in a Python loop; and each library's batch API) and
prints MB/s (UTF-8 megabytes, best of ``--repeat`` runs) with the ratio to tiktoken measured in the
same run.  Also reports: that all three give the same ids, the memory of a loaded OPT vocabulary
(tracemalloc), the one-time cost of the first call (Numba kernel load or compile, character table)
and the time to train an 8k vocabulary on the corpus.  tiktoken and ``tokenizers`` are optional
(``pip install -e '.[bench]'``); missing peers are reported as such.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import tracemalloc

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def best_time(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def load_peers(gpt2_dir):
    peers = {}
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        from refopt.tokenizers import GPT2_SPLIT_PATTERN
        ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2_dir / "merges.txt"),
                                                str(gpt2_dir / "vocab.json"))
        enc = tiktoken.Encoding("gpt2_local", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                special_tokens={"<|endoftext|>": 50256})
        peers["tiktoken"] = {
            "one": enc.encode_ordinary,
            "batch": lambda lines: enc.encode_ordinary_batch(lines, num_threads=1),
            "version": tiktoken.__version__ if hasattr(tiktoken, "__version__") else "?"}
    except ImportError:
        pass
    try:
        import tokenizers
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        tk = Tokenizer(models.BPE.from_file(str(gpt2_dir / "vocab.json"),
                                            str(gpt2_dir / "merges.txt")))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        peers["tokenizers"] = {
            "one": lambda s: tk.encode(s, add_special_tokens=False).ids,
            "batch": lambda lines: [e.ids for e in tk.encode_batch(lines,
                                                                   add_special_tokens=False)],
            "version": tokenizers.__version__}
    except ImportError:
        pass
    return peers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--corpus", default=str(SHARED / "data" / "corpus" / "tinyshakespeare.txt"))
    parser.add_argument("--no-train", action="store_true", help="skip the trainer timing")
    args = parser.parse_args(argv)
    gpt2_dir, opt_dir = SHARED / "data" / "gpt2", SHARED / "data" / "opt"
    if not gpt2_dir.is_dir() or not os.path.isfile(args.corpus):
        sys.exit(f"needs {gpt2_dir} and {args.corpus} (the ../shared data directory)")
    # Single-threaded peers, for a like-for-like comparison.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from refopt.models import OPTTokenizer
    from refopt.tokenizers import BytePairTokenizer

    text = pathlib.Path(args.corpus).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    megabytes = len(text.encode("utf-8")) / 1e6

    t = time.perf_counter()
    refopt_tok = BytePairTokenizer(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt"))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    refopt_tok("warm up")
    first_call_s = time.perf_counter() - t
    python_tok = BytePairTokenizer(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt"),
                                   compiled=False)

    libs = {"refopt": {"one": refopt_tok.tokenize, "batch": refopt_tok.tokenize}}
    libs.update(load_peers(gpt2_dir))
    libs["refopt (pure Python)"] = {"one": python_tok.tokenize, "batch": python_tok.tokenize}

    results, reference_ids = {}, None
    for name, lib in libs.items():
        ids = lib["one"](text)
        if reference_ids is None:
            reference_ids = ids
        same = ids == reference_ids
        repeat = 1 if "pure Python" in name else args.repeat
        one = best_time(lambda: lib["one"](text), repeat)
        per_line = best_time(lambda: [lib["one"](line) for line in lines], repeat)
        batch = best_time(lambda: lib["batch"](lines), repeat)
        results[name] = (megabytes / one, megabytes / per_line, megabytes / batch, same)

    base = results.get("tiktoken")
    print(f"\nCorpus: {args.corpus} ({megabytes:.3f} MB, {len(lines)} lines, "
          f"{len(reference_ids)} GPT-2 tokens); best of {args.repeat}\n")
    print("| library | one string MB/s | vs tiktoken | line by line MB/s | vs tiktoken "
          "| batch API MB/s | vs tiktoken | same ids |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, (one, per_line, batch, same) in results.items():
        def ratio(x, i):
            return f"{x / base[i]:.2f}x" if base else "n/a"
        print(f"| {name} | {one:.1f} | {ratio(one, 0)} | {per_line:.1f} | {ratio(per_line, 1)} | "
              f"{batch:.1f} | {ratio(batch, 2)} | {'yes' if same else 'NO'} |")
    missing = [p for p in ("tiktoken", "tokenizers") if p not in libs]
    if missing:
        print(f"\n(not installed: {', '.join(missing)}; pip install -e '.[bench]')")
    print("\nline by line: one call per line in a Python loop; batch API: refopt "
          "tokenizer(list), tiktoken encode_ordinary_batch(num_threads=1), tokenizers "
          "encode_batch (RAYON_NUM_THREADS=1).")
    print(f"refopt GPT-2 vocabulary load: {load_s * 1e3:.0f} ms; first call (Numba kernel "
          f"load/compile + character table): {first_call_s * 1e3:.0f} ms")

    if opt_dir.is_dir():
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        opt = OPTTokenizer(str(opt_dir / "vocab.json"), str(opt_dir / "merges.txt"))
        loaded = tracemalloc.get_traced_memory()[0] - before
        opt("warm up")
        encoding = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        print(f"OPT vocabulary ({opt.vocabulary_size()} tokens, {len(opt.merges)} merges) "
              f"loaded: {loaded / 2**20:.1f} MiB (tracemalloc); with the compiled tables and word "
              f"cache after the first call: {encoding / 2**20:.1f} MiB")

    if not args.no_train:
        from refopt.tokenizers import train_bpe
        t = time.perf_counter()
        vocab, merges = train_bpe(pathlib.Path(args.corpus), 8192)
        print(f"train_bpe: {len(vocab)} tokens ({len(merges)} merges) on the corpus in "
              f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
