"""refopt's CUDA backend beside PyTorch on the same GPU, in one run (float32 throughout).

    python benchmarks/bench_gpu.py [--only gemm attention decode train] [--new 64] [--repeats 5]
                                   [--no-compile] [--json PATH]

* **GEMM** ``4096^3``: :func:`refopt.kernels.cuda.gemm.gemm` (``"nt"``: ``x @ W.T``, the layout of
  every linear map; each tile configuration tried, the best reported) against ``torch.matmul`` in
  float32 with TF32 off (cuBLAS's float32 kernels).  TFLOP/s = ``2 M N K / time``.  The
  training shapes' rows time one call from Python (the host's cost of the launches included);
  their note adds the ratio of the same launches replayed from a CUDA graph.
* **Causal attention** (batch 8, 12 heads, 2048 tokens, head 64): refopt's flash kernel against
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on float32 tensors (PyTorch
  picks its fastest float32 kernel).  TFLOP/s counts the causal half: ``2 B H T^2 K``.
* **Greedy decode** of a random 125m-shaped model (12 layers, 768/3072, vocabulary 50,272), prompt
  8 + ``--new`` tokens, batch 1 and 32: refopt's device-resident loop (weights already on the GPU,
  as the peer's; prefill included; 16 steps per launch, and 1 per launch as when streaming)
  against transformers ``generate`` on the GPU, eager with its dynamic cache, and with
  ``cache_implementation="static"`` and ``torch.compile`` (unless ``--no-compile``).  Tokens/s =
  batch x new / wall time; "same" = the fraction of rows whose ids equal transformers' eager ones
  (random weights give near-ties, so rounding can flip a choice).  The half-weight rows
  (``--weights``: refopt's matrices in bfloat16 / float16 on the device, float32 sums) stand
  beside the same float32 peers; their ids differ from the peers' where rounding the weights
  flips a choice.
* **One training step** of a random 125m model (batch 8 x 128 and 32 x 512, forward + backward +
  AdamW): the device-resident step (:class:`refopt.training.device.DeviceTrainer`, what ``fit``
  runs on the cuda backend) against transformers + ``torch.optim.AdamW`` on the GPU, eager, TF32
  off; milliseconds, the ratio is the peer's time over ours (above 1: refopt is faster).
* **A whole fit epoch** with the bundled recipe's model and batch (random windows, ``--fit-steps``
  steps): tokens/s of ``OPTCausalLM.fit`` on the cuda backend against a transformers model of the
  same shape trained by a loop with ``torch.optim.AdamW`` and global-norm clipping.

Every time is the median of ``--repeats`` runs after a warm-up, bracketed by device
synchronisation (CUDA events for the single kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cuda_event_times, torch_event_times  # noqa: E402


def median_time(fn, repeats, sync):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def event_time(fn, repeats):
    """Median milliseconds of ``fn`` between two numba CUDA events (after a warm-up)."""
    return statistics.median(cuda_event_times(fn, repeats))


def torch_event_time(fn, repeats):
    """Median milliseconds of ``fn`` between two torch CUDA events (after a warm-up)."""
    return statistics.median(torch_event_times(fn, repeats))


def graph_time(launches, repeats):
    """Milliseconds per replay of the CUDA graph captured from ``launches(stream)`` (the launches'
    device time without the host's cost of issuing them; refopt's training step replays graphs)."""
    from numba import cuda

    from refopt.kernels.cuda import graphs

    stream = cuda.stream()
    launches(stream)                      # sizes any workspace outside the capture
    stream.synchronize()
    graph = graphs.capture(stream, lambda: launches(stream))
    graphs.launch(graph, stream)
    a, b = cuda.event(), cuda.event()
    a.record(stream)
    for _ in range(repeats):
        graphs.launch(graph, stream)
    b.record(stream)
    b.synchronize()
    return cuda.event_elapsed_time(a, b) / repeats


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---------------------------------------------------------------------------------- GEMM
def bench_gemm(args, rows):
    import torch
    from numba import cuda

    from refopt.kernels.cuda import gemm as G

    n = args.gemm
    reps = max(args.repeats, 20)        # a product is cheap: the medians of 20 calls (gemm_shapes')
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", generator=g)
    w = torch.randn(n, n, device="cuda", generator=g)
    ms_torch = torch_event_time(lambda: torch.matmul(a, w.T), reps)
    want = torch.matmul(a, w.T)
    da, dw = cuda.as_cuda_array(a), cuda.as_cuda_array(w)
    out = cuda.device_array((n, n), np.float32)
    best = None
    for config in ("large", "large1", "large16", "wide"):
        ms = event_time(lambda: G.gemm(da, dw, "nt", out=out, config=config), reps)
        err = rel_err(out.copy_to_host(), want.cpu().numpy())
        print(f"  gemm {config:6s} {ms:8.3f} ms  {2 * n**3 / ms / 1e9:6.1f} TFLOP/s  rel err {err:.1e}",
              flush=True)
        if best is None or ms < best[1]:
            best = (config, ms, err)
    flops = 2 * n ** 3
    rows.append({"what": f"GEMM {n}^3 float32 (TFLOP/s)", "ours": flops / best[1] / 1e9,
                 "peer": flops / ms_torch / 1e9, "peer_name": "cuBLAS (torch.matmul, TF32 off)",
                 "note": f"tile {best[0]}, rel err {best[2]:.1e}"})
    # the training shapes: tokens x hidden x MLP, in the three layouts (our default tiles, split-K)
    M, N, K = 1024, 768, 3072
    for layout in ("nt", "nn", "tn"):
        A = torch.randn(*((K, M) if layout == "tn" else (M, K)), device="cuda", generator=g)
        B = torch.randn(*((N, K) if layout == "nt" else (K, N)), device="cuda", generator=g)
        ta, tb = (A.T if layout == "tn" else A), (B.T if layout == "nt" else B)
        ms_t = torch_event_time(lambda: torch.matmul(ta, tb), reps)
        dA, dB = cuda.as_cuda_array(A), cuda.as_cuda_array(B)
        o = cuda.device_array((M, N), np.float32)
        ms = event_time(lambda: G.gemm(dA, dB, layout, out=o), reps)
        err = rel_err(o.copy_to_host(), torch.matmul(ta, tb).cpu().numpy())
        ms_graph = graph_time(lambda s: G.gemm(dA, dB, layout, out=o, stream=s), 20)
        f = 2 * M * N * K
        rows.append({"what": f"GEMM {layout} {M}x{N}x{K} (TFLOP/s)", "ours": f / ms / 1e9,
                     "peer": f / ms_t / 1e9, "peer_name": "cuBLAS (torch.matmul, TF32 off)",
                     "note": f"rel err {err:.1e}; replayed from a CUDA graph (kernels alone, as the "
                             f"training step runs them) {ms_t / ms_graph:.2f}x"})


# ---------------------------------------------------------------------------------- attention
def bench_attention(args, rows):
    import torch
    import torch.nn.functional as F
    from numba import cuda

    from refopt.kernels.cuda import attention as A

    B, H, T, K = 8, 12, args.seq, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, K, device="cuda", generator=g) for _ in range(3))
    ms_torch = torch_event_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                args.repeats)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    dq, dk, dv = (cuda.as_cuda_array(t.reshape(-1)) for t in (q, k, v))
    out = cuda.device_array(B * H * T * K, np.float32)
    strides = (H * T * K, T * K, K)

    def ours():
        A.flash_attention(dq, dk, dv, out, strides, strides, strides, strides, B, H, T, T, K,
                          causal=True, scale=K ** -0.5)
    ms = event_time(ours, args.repeats)
    err = rel_err(out.copy_to_host().reshape(B, H, T, K), want.cpu().numpy())
    flops = 2 * B * H * T * T * K               # causal: half of 4 B H T^2 K
    rows.append({"what": f"causal attention {B}x{H}x{T}x{K} (TFLOP/s)", "ours": flops / ms / 1e9,
                 "peer": flops / ms_torch / 1e9, "peer_name": "torch SDPA float32",
                 "note": f"rel err {err:.1e}; {ms:.2f} ms vs {ms_torch:.2f} ms"})

    # forward + backward (the flash backward recomputes the probabilities), as training runs it
    from refopt.kernels.cuda.flash_backward import flash_backward

    m, l, dlt = (cuda.device_array(B * H * T, np.float32) for _ in range(3))
    d_out = torch.randn(B, H, T, K, device="cuda", generator=g)
    ddo = cuda.as_cuda_array(d_out.reshape(-1))
    grads = [cuda.device_array(B * H * T * K, np.float32) for _ in range(3)]
    km = cuda.to_device(np.ones((B, T), np.uint8))
    st = dict.fromkeys(("q", "k", "v", "o", "d_o", "d_q", "d_k", "d_v"), strides)

    def ours_fb():
        A.flash_attention(dq, dk, dv, out, strides, strides, strides, strides, B, H, T, T, K,
                          key_mask=km, causal=True, scale=K ** -0.5, stats=(m, l))
        flash_backward(dq, dk, dv, out, ddo, m, l, km, *grads, dlt, st, B, H, T, T, K, causal=True,
                       scale=K ** -0.5)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def theirs_fb():
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
        torch.autograd.grad(o, (qg, kg, vg), d_out)
    ms_fb = event_time(ours_fb, args.repeats)
    ms_fb_torch = torch_event_time(theirs_fb, args.repeats)
    want_g = torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg, is_causal=True),
                                 (qg, kg, vg), d_out)
    err_fb = max(rel_err(gr.copy_to_host().reshape(B, H, T, K), w.cpu().numpy())
                 for gr, w in zip(grads, want_g))
    flops_fb = 3.5 * flops                        # backward: five products to the forward's two
    rows.append({"what": f"causal attention fwd+bwd {B}x{H}x{T}x{K} (TFLOP/s)",
                 "ours": flops_fb / ms_fb / 1e9, "peer": flops_fb / ms_fb_torch / 1e9,
                 "peer_name": "torch SDPA float32 + autograd",
                 "note": f"rel err {err_fb:.1e}; {ms_fb:.2f} ms vs {ms_fb_torch:.2f} ms"})


# ---------------------------------------------------------------------------------- decode
def bench_decode(args, rows, tmp):
    import torch
    import transformers

    from _common import write_random_checkpoint
    from refopt.kernels.cuda.decode import DeviceModel
    from refopt.models import OPTCausalLM

    path = os.path.join(tmp, "opt125m")
    write_random_checkpoint(path, layers=12)
    lm = OPTCausalLM.from_preset(path, preprocessor=None)
    dms = {kind: DeviceModel(lm.backbone.params, lm.backbone.config, weights=kind) for kind in args.weights}
    hf = transformers.OPTForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    sync = torch.cuda.synchronize
    V, P, N = lm.backbone.config.vocabulary_size, args.prompt, args.new
    for batch in args.batch:
        rng = np.random.default_rng(batch)
        prompt = rng.integers(3, V, (batch, P))
        ids = np.ones((batch, P + N), np.int64)
        ids[:, :P] = prompt
        mask = np.zeros(ids.shape, bool)
        mask[:, :P] = True
        tids = torch.tensor(prompt, device="cuda")

        def theirs(**kw):
            with torch.no_grad():
                return hf.generate(input_ids=tids, attention_mask=torch.ones_like(tids), do_sample=False,
                                   max_new_tokens=N, min_new_tokens=N, pad_token_id=1, **kw)
        t_eager = median_time(theirs, args.repeats, sync)
        ref_ids = theirs().cpu().numpy()
        res = {}
        for kind, dm in dms.items():
            for per in ((16, 1) if kind == "float32" else (16,)):
                t = median_time(lambda: dm.decode(ids, mask, P, "greedy", steps_per_launch=per),
                                args.repeats, sync)
                out = dm.decode(ids, mask, P, "greedy", steps_per_launch=per)
                res[kind, per] = (t, float(np.mean([np.array_equal(out[b], ref_ids[b]) for b in range(batch)])))
        t_comp = None
        if not args.no_compile:
            # transformers compiles the forward itself for a static cache (its CompileConfig:
            # torch.compile, mode "reduce-overhead", i.e. CUDA graphs); the dynamic-cache
            # calls above stay eager
            try:
                t_comp = median_time(lambda: theirs(cache_implementation="static"), args.repeats, sync)
                if getattr(hf, "_compiled_call", None) is None:
                    print("  note: transformers did not compile its forward for the static cache", flush=True)
            except Exception as e:                    # report, don't fail the whole table
                print(f"  torch.compile run failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        rate = lambda t: batch * N / t                                                  # noqa: E731
        for (kind, per), (t, same) in res.items():
            weights = "" if kind == "float32" else f", {kind} weights"
            rows.append({"what": f"greedy decode 125m{weights}, batch {batch}, {per} step/launch (tok/s)",
                         "ours": rate(t), "peer": rate(t_eager), "peer_name": "transformers eager",
                         "peer2": None if t_comp is None else rate(t_comp),
                         "peer2_name": "static cache + torch.compile", "note": f"same ids {same:.2f}"})
        print(f"  decode batch {batch}: ours " + ", ".join(f"{k} {rate(res[k, 16][0]):.0f}" for k in dms)
              + f" tok/s, eager {rate(t_eager):.0f}, "
              f"compiled {'-' if t_comp is None else f'{rate(t_comp):.0f}'}", flush=True)


# ---------------------------------------------------------------------------------- training
def _hf_step(hf, topt, tids):
    def step():
        topt.zero_grad()
        out = hf(input_ids=tids, labels=tids)
        out.loss.backward()
        topt.step()
    return step


def bench_train(args, rows, tmp):
    """One optimizer step (forward, backward, AdamW) of a random 125m model, device-resident."""
    import torch
    import transformers

    from _common import write_random_checkpoint
    from refopt.models import OPTCausalLM
    from refopt.optimizers import AdamW
    from refopt.training.device import DeviceTrainer
    from refopt.training.gradients import check_batch

    path = os.path.join(tmp, "opt125m_train")
    write_random_checkpoint(path, layers=12)
    lm = OPTCausalLM.from_preset(path, preprocessor=None)
    cfg = lm.backbone.config
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize
    hf = transformers.OPTForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().train()
    topt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    trainer = DeviceTrainer(lm.backbone.params, cfg, AdamW(learning_rate=1e-5))
    for B, S in args.train_shapes:
        rng = np.random.default_rng(B * S)
        ids = rng.integers(3, cfg.vocabulary_size, (B, S))
        batch = check_batch(cfg, {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)},
                            np.roll(ids, -1, 1))
        t_ours = median_time(lambda: trainer.step(batch, batch.y.size), args.repeats, sync)
        t_hf = median_time(_hf_step(hf, topt, torch.tensor(ids, device="cuda")), args.repeats, sync)
        graphs = "CUDA graph" if trainer.use_graphs else f"no graph ({trainer.graph_error or 'off'})"
        rows.append({"what": f"training step 125m {B}x{S} (ms)", "ours": t_ours * 1e3,
                     "peer": t_hf * 1e3, "peer_name": "transformers eager + torch AdamW, TF32 off",
                     "lower": True, "note": f"{B * S / t_ours:,.0f} vs {B * S / t_hf:,.0f} tokens/s; "
                                            f"{graphs}"})
        print(f"  train {B}x{S}: {t_ours * 1e3:.1f} ms vs {t_hf * 1e3:.1f} ms", flush=True)


def bench_fit(args, rows, tmp):
    """Tokens/s of a whole ``fit`` epoch with the bundled recipe's model, batch and schedule (random
    windows), beside the same model in transformers trained by a loop with torch's AdamW."""
    import torch
    import transformers

    from refopt.models import OPTBackbone, OPTCausalLM
    from refopt.optimizers import AdamW
    from refopt.recipe import Recipe

    r = Recipe()
    B, S, n = r.batch_size, r.sequence_length, r.batch_size * args.fit_steps
    backbone = OPTBackbone(vocabulary_size=r.vocab_size, num_layers=r.num_layers, num_heads=r.num_heads,
                           hidden_dim=r.hidden_dim, intermediate_dim=r.intermediate_dim,
                           dropout=r.dropout, max_sequence_length=r.max_sequence_length, seed=0)
    backbone.backend = "cuda"
    lm = OPTCausalLM(backbone)
    lm.compile(optimizer=AdamW(learning_rate=r.learning_rate, weight_decay=r.weight_decay,
                               beta_2=r.beta_2, global_clipnorm=r.global_clipnorm))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, r.vocab_size, (n, S))
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    lm.fit({"token_ids": ids[:2 * B], "padding_mask": x["padding_mask"][:2 * B]},
           np.roll(ids[:2 * B], -1, 1), batch_size=B, epochs=1, verbose=0)         # compile, warm up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    lm.fit(x, np.roll(ids, -1, 1), batch_size=B, epochs=1, verbose=0)
    t_ours = time.perf_counter() - t0
    cfg = transformers.OPTConfig(vocab_size=r.vocab_size, hidden_size=r.hidden_dim,
                                 num_hidden_layers=r.num_layers, ffn_dim=r.intermediate_dim,
                                 num_attention_heads=r.num_heads, max_position_embeddings=S,
                                 dropout=r.dropout, word_embed_proj_dim=r.hidden_dim)
    hf = transformers.OPTForCausalLM(cfg).cuda().train()
    topt = torch.optim.AdamW(hf.parameters(), lr=r.learning_rate, weight_decay=r.weight_decay,
                             betas=(r.beta_1, r.beta_2))
    tids = torch.tensor(ids, device="cuda")

    def epoch(rows_):
        for i in range(0, rows_, B):
            topt.zero_grad()
            loss = hf(input_ids=tids[i:i + B], labels=tids[i:i + B]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), r.global_clipnorm)
            topt.step()
        torch.cuda.synchronize()
    epoch(2 * B)
    t0 = time.perf_counter()
    epoch(n)
    t_hf = time.perf_counter() - t0
    rows.append({"what": f"fit epoch, bundled recipe {B}x{S}, {args.fit_steps} steps (tokens/s)",
                 "ours": n * S / t_ours, "peer": n * S / t_hf,
                 "peer_name": "transformers + torch AdamW loop",
                 "note": f"{r.num_layers}x{r.hidden_dim}, vocab {r.vocab_size}"})
    print(f"  fit: {n * S / t_ours:,.0f} vs {n * S / t_hf:,.0f} tokens/s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=["gemm", "attention", "decode", "train", "fit"])
    ap.add_argument("--train-shapes", type=lambda t: tuple(map(int, t.split("x"))), nargs="+",
                    default=[(8, 128), (32, 512)], metavar="BxS")
    ap.add_argument("--fit-steps", type=int, default=200)
    ap.add_argument("--gemm", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--weights", nargs="+", default=["float32", "bfloat16", "float16"],
                    choices=("float32", "bfloat16", "float16"),
                    help="decode: how refopt's device copy stores the matrices (float32 first)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch
    from numba import cuda

    import numba
    dev = cuda.get_current_device()
    print(f"GPU {dev.name.decode() if isinstance(dev.name, bytes) else dev.name}, "
          f"numba {numba.__version__}, numpy {np.__version__}, torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.only:
            t0 = time.perf_counter()
            try:
                {"gemm": lambda: bench_gemm(args, rows), "attention": lambda: bench_attention(args, rows),
                 "decode": lambda: bench_decode(args, rows, tmp),
                 "train": lambda: bench_train(args, rows, tmp),
                 "fit": lambda: bench_fit(args, rows, tmp)}[part]()
            except Exception as e:
                import traceback
                traceback.print_exc()
                rows.append({"what": part, "ours": None, "peer": None, "note": f"FAILED {type(e).__name__}: {e}"})
            print(f"[{part}: {time.perf_counter() - t0:.0f} s]", flush=True)
    print()
    print(f"{'measure':58s}{'refopt':>10s}{'peer':>10s}{'ratio':>8s}{'peer 2':>10s}{'ratio':>8s}  note")
    for r in rows:
        ours, peer, p2 = r.get("ours"), r.get("peer"), r.get("peer2")
        f = lambda x: "-" if x is None else f"{x:.1f}"                                   # noqa: E731
        ratio = "-" if not (ours and peer) else f"{(peer / ours if r.get('lower') else ours / peer):.2f}x"
        ratio2 = "-" if not (ours and p2) else f"{ours / p2:.2f}x"
        print(f"{r['what']:58s}{f(ours):>10s}{f(peer):>10s}{ratio:>8s}{f(p2):>10s}{ratio2:>8s}  "
              f"{r.get('peer_name', '')}{'; ' if r.get('note') else ''}{r.get('note', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
