"""The arithmetic of one device-resident training step: the launches of the forward, the loss and
the backward, on flat device buffers (:mod:`refopt.training.device_buffers`), as the
:mod:`refopt.training.device` docstring writes them.  :class:`refopt.training.device.DeviceTrainer`
owns the buffers, the stream and the update, and calls these (directly, or once to capture them in
a CUDA graph).
"""

from __future__ import annotations

from refopt.training.device_buffers import LAYER_WEIGHTS


def layer_weights(cfg, lay, flat, i):
    """Layer ``i``'s weights (or gradients) in the flat buffer ``flat``, by name; q, k and v
    adjacent, so ``qkv.weight`` / ``qkv.bias`` view the three as one."""
    D = cfg.hidden_dim
    p = f"layers.{i}."
    w = {n: lay.view(flat, p + n) for n in LAYER_WEIGHTS}
    w["qkv.weight"] = lay.span(flat, p + "q_proj.weight", (3 * D, D))
    w["qkv.bias"] = lay.span(flat, p + "q_proj.bias", (3 * D,))
    return w

def forward(cfg, lay, P, buf, views, B, S, dropout, s):
    """The forward's launches on stream ``s`` (the lines of :mod:`refopt.training.device`'s
    docstring, top to bottom), from parameters ``P`` (flat, laid out by ``lay``) into ``buf``."""
    from refopt.kernels.cuda import attention, fused, gemm, rows

    N, D, H = B * S, cfg.hidden_dim, cfg.num_heads
    K = D // H
    eps = cfg.layer_norm_epsilon
    X = buf.X
    fused.embed(lay.view(P, "embed_tokens"), lay.view(P, "embed_positions"), views["ids"],
                views["pos"], X[0, :N], stream=s)
    s3, s1 = (S * 3 * D, K, 3 * D), (S * D, K, D)
    for i in range(cfg.num_layers):
        w = layer_weights(cfg, lay, P, i)
        j = i if buf.train else 0
        x_in, x_out = (X[i, :N], X[i + 1, :N]) if buf.train else (X[i % 2, :N], X[(i + 1) % 2, :N])
        st = buf.stats[j]
        a, qkv, ctx, r1, mm, h = (buf.A[j, :N], buf.QKV[j, :N], buf.CTX[j, :N], buf.R1[j, :N],
                                  buf.MM[j, :N], buf.H[j, :N])
        keep1 = keep2 = None
        if dropout:
            for site in range(2):
                fused.dropout_keep(buf.keep[i, site, :N * D], cfg.dropout, views["dropout"],
                                   2 * i + site, stream=s)
            keep1 = buf.keep[i, 0, :N * D].reshape(N, D)
            keep2 = buf.keep[i, 1, :N * D].reshape(N, D)
        rows.layernorm(x_in, w["self_attn_layer_norm.gamma"], w["self_attn_layer_norm.beta"], eps,
                       y=a, stats=(st[0, :N], st[1, :N]), stream=s)
        gemm.gemm(a, w["qkv.weight"], "nt", bias=w["qkv.bias"], out=qkv, stream=s)
        flat = qkv.reshape(-1)
        attention.flash_attention(flat, flat[D:], flat[2 * D:], ctx.reshape(-1), s3, s3, s3, s1,
                                  B, H, S, S, K, key_mask=views["key_mask"], causal=True,
                                  stats=(st[4, :B * H * S], st[5, :B * H * S]),
                                  scale=cfg.head_dim ** -0.5, stream=s)
        gemm.gemm(ctx, w["out_proj.weight"], "nt", bias=w["out_proj.bias"], out=r1, residual=x_in,
                  keep=keep1, stream=s)
        rows.layernorm(r1, w["mlp_layer_norm.gamma"], w["mlp_layer_norm.beta"], eps, y=mm,
                       stats=(st[2, :N], st[3, :N]), stream=s)
        gemm.gemm(mm, w["fc1.weight"], "nt", bias=w["fc1.bias"], relu=True, out=h, stream=s)
        gemm.gemm(h, w["fc2.weight"], "nt", bias=w["fc2.bias"], out=x_out, residual=r1, keep=keep2,
                  stream=s)
    x_last = X[cfg.num_layers, :N] if buf.train else X[cfg.num_layers % 2, :N]
    rows.layernorm(x_last, lay.view(P, "final_layer_norm.gamma"),
                   lay.view(P, "final_layer_norm.beta"), eps, y=buf.Y[:N],
                   stats=(buf.final_stats[0, :N], buf.final_stats[1, :N]), stream=s)
    gemm.gemm(buf.Y[:N], lay.view(P, "embed_tokens"), "nt", out=buf.logits[:N], stream=s)

def loss(buf, views, N, write_grad, s):
    """Cross-entropy, accuracy hits and (``write_grad``) d_logits in place; the weighted sums."""
    from refopt.kernels.cuda import fused

    fused.cross_entropy_grad(buf.logits[:N], views["targets"], views["d_ce"], buf.ce[:N],
                             buf.hit[:N], write_grad=write_grad, stream=s)
    fused.weighted_sums(buf.ce[:N], buf.hit[:N], views["sw"], buf.sums, stream=s)

def backward(cfg, lay, P, G, buf, views, B, S, dropout, s):
    """The backward's launches on stream ``s``: the forward's lines bottom to top, gradients into
    ``G`` (flat, laid out as ``P``), the embeddings' scatter-adds last."""
    from refopt.kernels.cuda import fused, gemm
    from refopt.kernels.cuda._common import fill
    from refopt.kernels.cuda.flash_backward import flash_backward

    N, D, H = B * S, cfg.hidden_dim, cfg.num_heads
    K = D // H
    logits, Y, X = buf.logits[:N], buf.Y[:N], buf.X
    part = buf.part
    dE = lay.view(G, "embed_tokens")
    dM, dF, dH, dQKV = buf.dM[:N], buf.dF[:N], buf.dH[:N], buf.dQKV[:N]
    gemm.gemm(logits, lay.view(P, "embed_tokens"), "nn", out=dM, stream=s)          # d_Y
    gemm.gemm(logits, Y, "tn", out=dE, stream=s)                                    # head's share
    cur, nxt = buf.dX[0, :N], buf.dX[1, :N]
    fused.layernorm_backward(dM, X[cfg.num_layers, :N], buf.final_stats[0, :N],
                             buf.final_stats[1, :N], lay.view(P, "final_layer_norm.gamma"), cur,
                             lay.view(G, "final_layer_norm.gamma"),
                             lay.view(G, "final_layer_norm.beta"), part, stream=s)
    s3, s1 = (S * 3 * D, K, 3 * D), (S * D, K, D)
    strides = {"q": s3, "k": s3, "v": s3, "o": s1, "d_o": s1, "d_q": s3, "d_k": s3, "d_v": s3}
    for i in reversed(range(cfg.num_layers)):
        w, g = layer_weights(cfg, lay, P, i), layer_weights(cfg, lay, G, i)
        st = buf.stats[i]
        # --- MLP block: X[i+1] = R1 + keep2 * (H @ W2.T + b2), H = relu(MM @ W1.T + b1)
        src = cur
        if dropout:
            fused.multiply(cur.reshape(-1), buf.keep[i, 1, :N * D], dF.reshape(-1), stream=s)
            src = dF
        gemm.gemm(src, w["fc2.weight"], "nn", out=dH, gate=buf.H[i, :N], stream=s)
        gemm.gemm(src, buf.H[i, :N], "tn", out=g["fc2.weight"], stream=s)
        fused.column_sums(src, g["fc2.bias"], part[0], stream=s)
        gemm.gemm(dH, w["fc1.weight"], "nn", out=dM, stream=s)
        gemm.gemm(dH, buf.MM[i, :N], "tn", out=g["fc1.weight"], stream=s)
        fused.column_sums(dH, g["fc1.bias"], part[0], stream=s)
        fused.layernorm_backward(dM, buf.R1[i, :N], st[2, :N], st[3, :N], w["mlp_layer_norm.gamma"],
                                 nxt, g["mlp_layer_norm.gamma"], g["mlp_layer_norm.beta"], part,
                                 d_res=cur, stream=s)
        cur, nxt = nxt, cur
        # --- attention block: R1 = X[i] + keep1 * (CTX @ Wo.T + bo), CTX = attention(QKV)
        src = cur
        if dropout:
            fused.multiply(cur.reshape(-1), buf.keep[i, 0, :N * D], dF.reshape(-1), stream=s)
            src = dF
        gemm.gemm(src, w["out_proj.weight"], "nn", out=dM, stream=s)                 # d_CTX
        gemm.gemm(src, buf.CTX[i, :N], "tn", out=g["out_proj.weight"], stream=s)
        fused.column_sums(src, g["out_proj.bias"], part[0], stream=s)
        qkv = buf.QKV[i, :N].reshape(-1)
        dq = dQKV.reshape(-1)
        flash_backward(qkv, qkv[D:], qkv[2 * D:], buf.CTX[i, :N].reshape(-1), dM.reshape(-1),
                       st[4, :B * H * S], st[5, :B * H * S], views["key_mask"], dq, dq[D:],
                       dq[2 * D:], buf.dlt[:B * H * S], strides, B, H, S, S, K, causal=True,
                       scale=cfg.head_dim ** -0.5, stream=s)
        gemm.gemm(dQKV, w["qkv.weight"], "nn", out=dM, stream=s)                      # d_A
        gemm.gemm(dQKV, buf.A[i, :N], "tn", out=g["qkv.weight"], stream=s)
        fused.column_sums(dQKV, g["qkv.bias"], part[0], stream=s)
        fused.layernorm_backward(dM, X[i, :N], st[0, :N], st[1, :N], w["self_attn_layer_norm.gamma"],
                                 nxt, g["self_attn_layer_norm.gamma"],
                                 g["self_attn_layer_norm.beta"], part, d_res=cur, stream=s)
        cur, nxt = nxt, cur
    # embeddings: positions' table from zero, the token table's share added to the head's
    dP = lay.view(G, "embed_positions")
    fill(dP.reshape(-1), 0, stream=s)
    fused.segment_sum(cur, *views["pos_seg"], views["pos_count"], dP, stream=s)
    fused.segment_sum(cur, *views["tok_seg"], views["tok_count"], dE, stream=s)
