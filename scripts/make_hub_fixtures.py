"""Write the fixtures of tests/data/hub_opt_*: ``tf_model.h5`` saved by transformers 4.x's
``TFOPTForCausalLM.save_pretrained``, ``flax_model.msgpack`` saved by
``FlaxOPTForCausalLM.save_pretrained`` and ``pytorch_model.bin`` saved by
``OPTForCausalLM.save_pretrained(safe_serialization=False)`` (also sharded, in ``<name>_sharded``),
beside their safetensors twin (``model.safetensors``, ``save_pretrained`` from the same weights)
and their ``config.json``.

transformers 5 dropped TensorFlow, Flax and pickled saves, so this runs in a separate environment,
e.g.::

    python -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install "transformers>=4.44,<5" "tf-keras~=2.21.0" tensorflow torch==2.13.0 \
        "jax[cpu]" flax
    /tmp/tfvenv/bin/python scripts/make_hub_fixtures.py tests/data

Two tiny random models (seed 0): ``hub_opt_tiny`` (pre-LayerNorm, like OPT-125m and the large ones)
and ``hub_opt_350m_like`` (post-LayerNorm with project_in/project_out, like OPT-350m).
"""

import os
import sys
import tempfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import FlaxOPTForCausalLM, OPTConfig, OPTForCausalLM, TFOPTForCausalLM  # noqa: E402

SHAPES = {
    "hub_opt_tiny": dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                        num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16),
    "hub_opt_350m_like": dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                             num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=8,
                             do_layer_norm_before=False),
}


def flax_chunked(out):
    """tests/data/flax_chunked.msgpack: Flax's chunked form of large arrays, at a 64-byte chunk size."""
    import flax.serialization as fs

    fs.MAX_CHUNK_SIZE = 64
    tree = {"model": {"decoder": {
        "embed_tokens": {"embedding": np.arange(60, dtype=np.float32).reshape(6, 10)},
        "final_layer_norm": {"scale": np.ones(3, np.float16), "bias": np.zeros(3, np.float16)}}}}
    with open(os.path.join(out, "flax_chunked.msgpack"), "wb") as f:
        f.write(fs.msgpack_serialize(tree))


def main(out):
    assert transformers.__version__ < "5", "TensorFlow models need transformers 4.x"
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        cfg = OPTConfig(**shape, pad_token_id=1, bos_token_id=2, eos_token_id=2)
        pt = OPTForCausalLM(cfg).eval()
        with torch.no_grad():                      # random LayerNorms and biases, not 1 and 0
            for p in pt.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        where = os.path.join(out, name)
        pt.save_pretrained(where, safe_serialization=True)
        pt.save_pretrained(where, safe_serialization=False)      # pytorch_model.bin
        pt.save_pretrained(where + "_sharded", safe_serialization=False, max_shard_size="20KB")
        with tempfile.TemporaryDirectory() as tmp:
            pt.save_pretrained(tmp, safe_serialization=False)
            tf_model = TFOPTForCausalLM.from_pretrained(tmp, from_pt=True)
            flax_model = FlaxOPTForCausalLM.from_pretrained(tmp, from_pt=True)
        tf_model.save_pretrained(where)            # writes tf_model.h5 (and config.json again)
        flax_model.save_pretrained(where)          # writes flax_model.msgpack
        for folder in (where, where + "_sharded"):
            if os.path.exists(os.path.join(folder, "generation_config.json")):
                os.remove(os.path.join(folder, "generation_config.json"))
        ids = np.array([[2, 5, 9, 33, 7, 1]])
        tf_logits = tf_model(ids).logits.numpy()
        pt_logits = pt(torch.tensor(ids)).logits.detach().numpy()
        flax_logits = np.asarray(flax_model(ids).logits)
        print(name, "tf vs torch max |diff|", float(np.abs(tf_logits - pt_logits).max()),
              "flax vs torch", float(np.abs(flax_logits - pt_logits).max()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data")
    flax_chunked(sys.argv[1] if len(sys.argv) > 1 else "tests/data")
