"""Device-resident training (:mod:`refopt.training.device`) against the NumPy reference: the flash
backward (hypothesis), whole-model gradients (random configs and the transformers fixture), the
dropout stream, and ``fit`` / ``evaluate`` / ``predict`` giving the NumPy backend's losses and
parameters.

Under Numba's CUDA simulator (CI) every launch costs tens of milliseconds, so the shapes are tiny
and ``fit`` takes two steps; on a GPU the same tests run at larger shapes.  Tolerances as in
``tests/test_kernels_cuda.py``: float64 within 1e-12 relative, float32 within 1e-5.
"""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refopt import backend

if not backend.available("cuda"):
    pytest.skip("the cuda backend is not available here: needs numba.cuda with a CUDA GPU, or "
                "NUMBA_ENABLE_CUDASIM=1 for Numba's simulator", allow_module_level=True)

import refopt.ops as ref  # noqa: E402
from numba import cuda  # noqa: E402
from refopt.config import OPTConfig  # noqa: E402
from refopt.kernels.cuda import attention as gattn  # noqa: E402
from refopt.kernels.cuda import flash_backward as gfb  # noqa: E402
from refopt.kernels.cuda import fused  # noqa: E402
from refopt.kernels.cuda._common import SIM, empty  # noqa: E402
from refopt.model import init_params  # noqa: E402
from refopt.training.device import DeviceTrainer, blocker  # noqa: E402
from refopt.training.gradients import check_batch, forward_backward  # noqa: E402
from tests_support import DTYPES, close  # noqa: E402

FULL = not SIM
EX = 10 if FULL else 3


def big(n):
    return n * 8 if FULL else n


@settings(max_examples=EX, deadline=None)
@given(dtype=DTYPES, B=st.integers(1, 2), H=st.integers(1, 2), S=st.integers(1, big(9)),
       K=st.sampled_from([3, 8] + ([64, 100] if FULL else [])), left=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_flash_backward(dtype, B, H, S, K, left, seed):
    rng = np.random.default_rng(seed)
    q, k, v, d_out = (rng.standard_normal((B, H, S, K)).astype(dtype) for _ in range(4))
    key = np.ones((B, S), bool)
    key[0, :min(left, S)] = False                          # left padding: all-masked query rows
    mask = ref.attention_mask(key, np.arange(S))
    out, probs = ref.attention_forward(q, k, v, mask)
    want = ref.attention_backward(d_out, q, k, v, probs, mask)
    st_ = (H * S * K, S * K, K)
    dev = [cuda.to_device(a.reshape(-1)) for a in (q, k, v, d_out)]
    o, m, l = empty(q.size, dtype), empty(B * H * S, dtype), empty(B * H * S, dtype)
    km = cuda.to_device(key.astype(np.uint8))
    gattn.flash_attention(dev[0], dev[1], dev[2], o, st_, st_, st_, st_, B, H, S, S, K, key_mask=km,
                          causal=True, stats=(m, l))
    grads = [empty(q.size, dtype) for _ in range(3)]
    gfb.flash_backward(dev[0], dev[1], dev[2], o, dev[3], m, l, km, *grads, empty(B * H * S, dtype),
                       dict.fromkeys(("q", "k", "v", "o", "d_o", "d_q", "d_k", "d_v"), st_),
                       B, H, S, S, K, causal=True)
    scale = np.abs(d_out).max() * (np.abs(q).max() + np.abs(k).max() + np.abs(v).max()) * S
    for name, g, w in zip(("d_q", "d_k", "d_v"), grads, want):
        close(g.copy_to_host().reshape(w.shape), w, dtype, name, scale)


@pytest.mark.parametrize("backward", ["v1", "v2", "v3"])
@settings(max_examples=EX, deadline=None)
@given(B=st.integers(1, 2 if FULL else 1), H=st.integers(1, 2), S=st.integers(17, big(20)),
       K=st.sampled_from([4, 8, 64]), left=st.sampled_from([0, 0, 3]), seed=st.integers(0, 2**16))
def test_flash_several_tiles(B, H, S, K, left, seed, backward):
    # float32 head widths in fours take the second forward (make_flash_forward_v2) and, by default, the
    # second backward (make_flash_backward_v2): sequences of several tiles a side, so that both the
    # tiles that need the masking selects (the diagonal, the ragged end, padded rows) and those that
    # skip them are run
    from refopt.kernels.cuda import attention as gattn_

    dtype = np.float32
    rng = np.random.default_rng(seed)
    q, k, v, d_out = (rng.standard_normal((B, H, S, K)).astype(dtype) for _ in range(4))
    key = np.ones((B, S), bool)
    key[0, :left] = False
    mask = ref.attention_mask(key, np.arange(S))
    scale = np.float32(K ** -0.5)
    out, probs = ref.attention_forward(q * scale, k, v, mask)
    want = ref.attention_backward(d_out, q * scale, k, v, probs, mask)
    st_ = (H * S * K, S * K, K)
    dev = [cuda.to_device(a.reshape(-1)) for a in (q, k, v, d_out)]
    assert gattn_.v2_fits(dtype, K, dev[:3], (st_,) * 3) and gfb.v2_fits(dtype, K, dev, (st_,) * 4)
    o, m, l = empty(q.size, dtype), empty(B * H * S, dtype), empty(B * H * S, dtype)
    km = cuda.to_device(key.astype(np.uint8))
    gattn.flash_attention(dev[0], dev[1], dev[2], o, st_, st_, st_, st_, B, H, S, S, K, key_mask=km,
                          causal=True, stats=(m, l), scale=float(scale))
    close(o.copy_to_host().reshape(q.shape), out, dtype, "out")
    grads = [empty(q.size, dtype) for _ in range(3)]
    default, gfb.VARIANT = gfb.VARIANT, backward
    try:
        gfb.flash_backward(dev[0], dev[1], dev[2], o, dev[3], m, l, km, *grads, empty(B * H * S, dtype),
                           dict.fromkeys(("q", "k", "v", "o", "d_o", "d_q", "d_k", "d_v"), st_),
                           B, H, S, S, K, causal=True, scale=float(scale))
    finally:
        gfb.VARIANT = default
    want = [want[0] * scale, want[1], want[2]]   # d_q: the gradient of the unscaled q
    bound = np.abs(d_out).max() * (np.abs(q).max() + np.abs(k).max() + np.abs(v).max()) * S
    for name, g, w in zip(("d_q", "d_k", "d_v"), grads, want):
        close(g.copy_to_host().reshape(w.shape), w, dtype, name, bound)


# steps a pass of the second kernels' loops: 1, a few, and all of a tile's in one pass (the source
# written out, as before the loops; under the simulator only: on a GPU that one compiles for minutes)
UNROLLS = [1, 2, 4, 32] if SIM else [1, 4, 8]


def test_flash_v2_unroll_changes_no_bit():
    # the second forward and backward give the same bits however many steps a pass their loops take
    B, H, S, K, dtype = 2, 2, 21, 8, np.float32
    rng = np.random.default_rng(7)
    q, k, v, d_out = (rng.standard_normal((B, H, S, K)).astype(dtype) for _ in range(4))
    key = np.ones((B, S), bool)
    key[0, :3] = False
    st_ = (H * S * K, S * K, K)
    dev = [cuda.to_device(a.reshape(-1)) for a in (q, k, v, d_out)]
    km = cuda.to_device(key.astype(np.uint8))
    strides = dict.fromkeys(("q", "k", "v", "o", "d_o", "d_q", "d_k", "d_v"), st_)
    runs = []
    saved = gattn.VARIANT, gattn.UNROLL, gfb.VARIANT, gfb.UNROLL
    try:
        for unroll in UNROLLS:
            gattn.VARIANT, gattn.UNROLL, gfb.VARIANT, gfb.UNROLL = "v2", unroll, "v2", unroll
            o, m, l = empty(q.size, dtype), empty(B * H * S, dtype), empty(B * H * S, dtype)
            gattn.flash_attention(dev[0], dev[1], dev[2], o, st_, st_, st_, st_, B, H, S, S, K, key_mask=km,
                                  causal=True, stats=(m, l), scale=0.5)
            grads = [empty(q.size, dtype) for _ in range(3)]
            gfb.flash_backward(dev[0], dev[1], dev[2], o, dev[3], m, l, km, *grads, empty(B * H * S, dtype),
                               strides, B, H, S, S, K, causal=True, scale=0.5)
            runs.append([a.copy_to_host() for a in (o, m, l, *grads)])
    finally:
        gattn.VARIANT, gattn.UNROLL, gfb.VARIANT, gfb.UNROLL = saved
    for unroll, run in zip(UNROLLS[1:], runs[1:]):
        for name, got, want in zip(("out", "m", "l", "d_q", "d_k", "d_v"), run, runs[0]):
            assert np.array_equal(got, want), f"{name}: unroll {unroll} differs from unroll {UNROLLS[0]}"


def test_flash_v2_source_does_not_grow_with_the_tile(monkeypatch):
    # the second kernels' head, query and key steps are loops (compile time: the steps written out,
    # the forward took 90 s and the backward 220 s of compile_ptx, benchmarks/GPU.md): their generated
    # source is as long for small tiles as for large ones
    def lines(module, tiles_fn, tiles, make, *args):
        monkeypatch.setattr(module, tiles_fn, lambda *a: tiles)
        made = make.__wrapped__(*args)                        # uncached: a new generation
        return len((made[0] if isinstance(made, tuple) else made).source.splitlines())

    fwd = [lines(gattn, "_tiles", t, gattn.make_flash_forward_v2, 64, True, True, 4)
           for t in [(16, 8), (32, 16), (64, 32)]]
    bwd = [lines(gfb, "_v2_tiles", t, gfb.make_flash_backward_v2, True, 4)
           for t in [(8, 8), (16, 16), (32, 32)]]
    assert len(set(fwd)) == 1, fwd
    assert len(set(bwd)) == 1, bwd


def _flash_v3_run(variant, B, H, S, T, K, lengths, left, causal, seed, cap=None):
    # forward (second kernels) then the backward `variant` (cap: its dS scratch bytes); the
    # gradients and the reference's, d_q of the unscaled q
    dtype = np.float32
    rng = np.random.default_rng(seed)
    q, d_out = (rng.standard_normal((B, H, S, K)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((B, H, T, K)).astype(dtype) for _ in range(2))
    cols = np.arange(T)
    key = np.stack([(cols >= T - n) if left else (cols < n) for n in lengths])
    mask = ref.attention_mask(key, np.arange(T - S, T)) if causal else np.broadcast_to(
        key[:, None, None, :], (B, 1, S, T))
    scale = np.float32(K ** -0.5)
    out, probs = ref.attention_forward(q * scale, k, v, mask)
    want = ref.attention_backward(d_out, q * scale, k, v, probs, mask)
    want = [want[0] * scale, want[1], want[2]]
    sq, skv = (H * S * K, S * K, K), (H * T * K, T * K, K)
    dev = [cuda.to_device(a.reshape(-1)) for a in (q, k, v, d_out)]
    assert gfb.v2_fits(dtype, K, dev, (sq, skv, skv, sq))
    km = cuda.to_device(key.astype(np.uint8))
    o, m, l = empty(q.size, dtype), empty(B * H * S, dtype), empty(B * H * S, dtype)
    gattn.flash_attention(dev[0], dev[1], dev[2], o, sq, skv, skv, sq, B, H, S, T, K, key_mask=km,
                          causal=causal, q_offset=T - S, stats=(m, l), scale=float(scale))
    grads = [empty(q.size, dtype), empty(k.size, dtype), empty(v.size, dtype)]
    strides = {"q": sq, "k": skv, "v": skv, "o": sq, "d_o": sq, "d_q": sq, "d_k": skv, "d_v": skv}
    saved = gfb.VARIANT, gfb.SCRATCH_BYTES
    gfb.VARIANT, gfb.SCRATCH_BYTES = variant, cap or gfb.SCRATCH_BYTES
    try:
        gfb.flash_backward(dev[0], dev[1], dev[2], o, dev[3], m, l, km, *grads, empty(B * H * S, dtype),
                           strides, B, H, S, T, K, causal=causal, q_offset=T - S, scale=float(scale))
    finally:
        gfb.VARIANT, gfb.SCRATCH_BYTES = saved
    bound = np.abs(d_out).max() * (np.abs(q).max() + np.abs(k).max() + np.abs(v).max()) * T
    return [g.copy_to_host().reshape(w.shape) for g, w in zip(grads, want)], want, bound


def _slice_bytes(S, T, causal):
    BQ, BT = gfb._v2_tiles()
    return gfb.scratch_layout(S, T, T - S, causal)[1] * BQ * BT * 4


# (B, H, S, T, K, key lengths, left padding, causal, slices a chunk of the dS scratch: None the
# default cap); tiles of 8 rows under the simulator, 32 on a GPU
F = 4 if FULL else 1
V3_CASES = [
    (2, 2, 19 * F, 19 * F, 8, [19 * F - 3, 19 * F], True, True, 1),     # padded rows, chunks of one slice
    (1, 3, 9 * F, 26 * F, 12, [20 * F], False, True, 2),                # q_offset 17 (S != T), right padding
    (2, 1, 17 * F, 17 * F, 4, [17 * F, 17 * F], False, True, None),     # the whole batch in one chunk
    (1, 2, 12 * F, 21 * F, 64, [21 * F], False, False, 1),              # no causal mask
    (3, 1, 1, 5, 8, [5, 2, 0], True, True, 2),                          # one query row, all keys padded
]


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("case", V3_CASES)
def test_flash_v3_matches_v2(case, prefetch, monkeypatch):
    # the third backward (dS written by dkdv to a scratch, dQ = dS k read back in chunks of slices)
    # gives the second's bits -- the same dS, summed in the same order -- and the reference's
    # gradients, its dq with and without the next tiles prefetched; the chunks' slices and the
    # scratch's tile pairs (q_offset, S != T, padding, head widths below 64, no causal mask) are
    # all exercised
    B, H, S, T, K, lengths, left, causal, per_chunk = case
    cap = per_chunk and per_chunk * _slice_bytes(S, T, causal)
    v2, want, bound = _flash_v3_run("v2", B, H, S, T, K, lengths, left, causal, 11)
    built = gfb.make_flash_backward_v2

    def scratch_only(causal, unroll=4, scratch=False, dq_prefetch=True):
        assert scratch, "the third backward fell back to the second"
        assert dq_prefetch == prefetch
        return built(causal, unroll, scratch, dq_prefetch)

    monkeypatch.setattr(gfb, "make_flash_backward_v2", scratch_only)
    monkeypatch.setattr(gfb, "DQ_PREFETCH", prefetch)
    v3, _, _ = _flash_v3_run("v3", B, H, S, T, K, lengths, left, causal, 11, cap)
    for name, a, b, w in zip(("d_q", "d_k", "d_v"), v3, v2, want):
        close(a, w, np.float32, f"v3 {name}", bound)
        assert np.array_equal(a, b), f"v3 {name} differs from v2's by {np.abs(a - b).max():.3g}"


def test_flash_v3_scratch_layout_and_chunks():
    # the scratch's pair offsets (the kernels' closed form) against a plain sum, and the chunks'
    # bound: never more than SCRATCH_BYTES, or no chunk (the second backward) when a slice is larger
    for nK in range(0, 7):
        for crow in range(-9, 9):
            for x in range(0, 12):
                want = sum(min(nK, max(0, r + crow)) for r in range(x))
                assert gfb.pairs_before(x, nK, crow) == want, (x, nK, crow)
    for Z in (1, 5, 96, 1000):
        for per in (1, 3 << 20, 8_519_680, gfb.SCRATCH_BYTES, gfb.SCRATCH_BYTES + 1):
            n = gfb._chunks(Z, per)
            if per > gfb.SCRATCH_BYTES:
                assert n == 0
            else:
                assert 1 <= n <= Z and n * per <= gfb.SCRATCH_BYTES


def test_dropout_keep_is_the_philox_stream():
    from refopt import philox

    scal = np.r_[7, philox.seed_to_key(1234)].astype(np.uint32).view(np.int32)
    out = empty(big(50), np.float32)
    fused.dropout_keep(out, 0.3, cuda.to_device(scal), stream_id=5)
    u = philox.uniform(1234, 7, stream=5, index=np.arange(out.shape[0]))
    want = np.where(u >= 0.3, np.float32(1 / 0.7), np.float32(0))
    assert np.array_equal(out.copy_to_host(), want)


def _config(dtype="float64", layers=1, dropout=0.0):
    return OPTConfig(vocabulary_size=big(19), num_layers=layers, num_heads=2, hidden_dim=big(4),
                     intermediate_dim=big(5), max_sequence_length=big(16), dropout=dropout, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_device_gradients_and_logits_match_numpy(dtype):
    from refopt.model import logits_forward

    cfg = _config(dtype, layers=2 if FULL else 1)
    params = init_params(cfg, seed=3, std=0.3)
    rng = np.random.default_rng(0)
    S = big(4)
    ids = rng.integers(0, cfg.vocabulary_size, (2, S))
    mask = np.ones((2, S), bool)
    mask[1, :2] = False                                      # left padding
    mask[0, -1] = False                                      # right padding
    batch = check_batch(cfg, {"token_ids": ids, "padding_mask": mask}, np.roll(ids, -1, 1),
                        mask.astype(float), np.dtype(dtype))
    want = forward_backward(params, cfg, batch, reduction="sum_over_batch_size", ops=ref)
    trainer = DeviceTrainer(params, cfg)
    loss, grads = trainer.gradients(batch, batch.y.size)
    dt = np.dtype(dtype)
    assert abs(loss - want.loss) <= (1e-12 if dtype == "float64" else 1e-5) * abs(want.loss)
    top = max(np.abs(g).max() for g in want.grads.values())
    for name, g in want.grads.items():
        close(grads[name], g, dt, name, max(np.abs(g).max(), 0.01 * top))
    close(trainer.logits(batch), logits_forward(params, cfg, ids, mask, ops=ref), dt, "logits")


@pytest.mark.skipif(SIM, reason="split-K shapes (K >= 512): on a GPU only")
def test_device_gradients_with_split_products():
    # enough tokens and vocabulary that the weight gradients and the head's input gradient are
    # split over K (refopt.kernels.cuda.gemm.split_count)
    cfg = OPTConfig(vocabulary_size=700, num_layers=1, num_heads=2, hidden_dim=64,
                    intermediate_dim=96, max_sequence_length=320, dropout=0.0, dtype="float64")
    params = init_params(cfg, seed=4, std=0.2)
    ids = np.random.default_rng(2).integers(0, 700, (2, 300))
    batch = check_batch(cfg, {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)},
                        np.roll(ids, -1, 1), None, np.float64)
    want = forward_backward(params, cfg, batch, reduction="sum_over_batch_size", ops=ref)
    loss, grads = DeviceTrainer(params, cfg).gradients(batch, batch.y.size)
    assert abs(loss - want.loss) <= 1e-12 * abs(want.loss)
    top = max(np.abs(g).max() for g in want.grads.values())
    for name, g in want.grads.items():
        close(grads[name], g, np.float64, name, max(np.abs(g).max(), 0.01 * top))


def test_device_dropout_gradients_match_numpy_with_the_same_masks():
    # the NumPy forward draws its dropout masks from dropout_rng.random(shape): hand it the device's
    # Philox uniforms (layer i: stream 2i after out_proj, 2i + 1 after fc2) and the two agree
    from refopt import philox

    cfg = _config(layers=2, dropout=0.3)
    params = init_params(cfg, seed=5, std=0.3)
    ids = np.random.default_rng(1).integers(0, cfg.vocabulary_size, (2, big(3)))
    batch = check_batch(cfg, {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)},
                        np.roll(ids, -1, 1), None, np.float64)
    trainer = DeviceTrainer(params, cfg, seed=11)
    seed = int(np.uint64(trainer.dropout_key[0]) | (np.uint64(trainer.dropout_key[1]) << np.uint64(32)))

    class DeviceStream:
        site = 0

        def random(self, shape):
            u = philox.uniform(seed, 0, stream=self.site, index=np.arange(int(np.prod(shape))))
            self.site += 1
            return u.reshape(shape)

    want = forward_backward(params, cfg, batch, dropout_rng=DeviceStream(),
                            reduction="sum_over_batch_size", ops=ref)
    loss, grads = trainer.gradients(batch, batch.y.size, dropout=True)
    assert abs(loss - want.loss) <= 1e-12 * abs(want.loss)
    top = max(np.abs(g).max() for g in want.grads.values())
    for name, g in want.grads.items():
        close(grads[name], g, np.float64, name, max(np.abs(g).max(), 0.01 * top))


@pytest.mark.skipif(SIM and not os.environ.get("REFOPT_SIM_SLOW"),
                    reason="the fixture's vocabulary takes ~100 s in the simulator: on a GPU, or with "
                           "REFOPT_SIM_SLOW=1")
def test_device_gradients_match_the_transformers_fixture():
    # transformers' float64 loss and gradients of the pre-LayerNorm fixture (padded rows included)
    from conftest import shared_path
    from refopt.io.checkpoint import from_state_dict
    from refopt.io.huggingface import grads_to_huggingface
    from refopt.io.safetensors_io import load

    d = shared_path("fixtures", "hf", "opt-tiny-preln")
    cfg = OPTConfig.from_file(d / "config.json")
    params, _ = from_state_dict(load(d / "model.safetensors"), cfg)
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    e = np.load(d / "expected.npz")
    ids, mask = e["token_ids"], e["padding_mask"]
    batch = check_batch(cfg, {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}, ids[:, 1:],
                        mask[:, 1:], np.float64)
    loss, grads = DeviceTrainer(params, cfg).gradients(batch, float(batch.sample_weight.sum()))
    assert abs(loss - float(e["loss_f64"])) <= 1e-9 * abs(float(e["loss_f64"]))
    ours = grads_to_huggingface(grads, cfg)
    expected = {k[len("grad/"):]: e[k] for k in e.files if k.startswith("grad/")}
    largest = max(np.abs(g).max() for g in expected.values())
    for name, want in expected.items():
        if name.endswith("k_proj.bias"):      # analytically zero: round-off on both sides
            assert np.abs(ours[name]).max() <= 1e-12 * largest
            continue
        assert np.abs(ours[name] - want).max() <= 1e-9 * np.abs(want).max(), name


def test_fit_on_the_device_matches_numpy():
    from refopt.models import OPTBackbone, OPTCausalLM
    from refopt.optimizers import AdamW

    cfg = _config()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocabulary_size, (big(4), 3))
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    y = np.roll(ids, -1, 1)
    out = {}
    for name in ("numpy", "cuda"):
        lm = OPTCausalLM(OPTBackbone.from_opt_config(cfg, init_params(cfg, seed=1, std=0.3)))
        lm.backend = name
        opt = AdamW(learning_rate=0.05, global_clipnorm=0.5)
        opt.exclude_from_weight_decay(["bias", "gamma", "beta"])
        lm.compile(optimizer=opt)
        history = lm.fit(x, y, batch_size=big(2), epochs=1, verbose=0, seed=3)
        out[name] = history.history, lm.backbone.params, opt
    (h_ref, p_ref, o_ref), (h, p, o) = out["numpy"], out["cuda"]
    for key in h_ref:
        np.testing.assert_allclose(h[key], h_ref[key], rtol=1e-12, atol=1e-15, err_msg=key)
    assert o.iterations == o_ref.iterations == 2
    for name in p_ref:
        if name.endswith("k_proj.bias"):   # its gradient is analytically 0: Adam follows round-off
            continue
        close(p[name], p_ref[name], np.float64, name)
        close(o._slots[name]["v"], o_ref._slots[name]["v"], np.float64, name + " v")


@pytest.mark.skipif(SIM, reason="more optimizer settings: on a GPU only (each simulated step is slow)")
@pytest.mark.parametrize("settings_", [dict(clipnorm=0.1, amsgrad=True, gradient_accumulation_steps=2),
                                       dict(clipvalue=0.01, weight_decay=0.1)])
def test_fit_optimizer_settings_on_the_device(settings_):
    from refopt.models import OPTBackbone, OPTCausalLM
    from refopt.optimizers import Adam

    cfg = _config(layers=2)
    ids = np.random.default_rng(1).integers(0, cfg.vocabulary_size, (8, 6))
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    result = {}
    for name in ("numpy", "cuda"):
        lm = OPTCausalLM(OPTBackbone.from_opt_config(cfg, init_params(cfg, seed=2, std=0.3)))
        lm.backend = name
        lm.compile(optimizer=Adam(learning_rate=0.02, **settings_))
        h = lm.fit(x, np.roll(ids, -1, 1), batch_size=2, epochs=2, verbose=0, seed=0,
                   validation_data=(x, np.roll(ids, -1, 1)))
        result[name] = h.history, lm.backbone.params
    for key in result["numpy"][0]:
        np.testing.assert_allclose(result["cuda"][0][key], result["numpy"][0][key], rtol=1e-11)
    for name, want in result["numpy"][1].items():
        if not name.endswith("k_proj.bias"):   # analytically zero gradient: Adam follows round-off
            close(result["cuda"][1][name], want, np.float64, name)


def test_blocker_names_what_runs_on_the_host_step():
    from refopt.optimizers import Adam, Optimizer

    assert blocker(_config(), Adam()) == ""
    post = OPTConfig(vocabulary_size=9, num_layers=1, num_heads=1, hidden_dim=2, intermediate_dim=2,
                     max_sequence_length=4, do_layer_norm_before=False)
    assert "post-LayerNorm" in blocker(post)

    class Custom(Optimizer):
        pass

    assert "Custom" in blocker(_config(), Custom(learning_rate=0.1))
