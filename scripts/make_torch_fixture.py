"""Write tests/data/torch_tiny: small ``torch.save`` checkpoints in both formats (the zip archive and the
legacy stream), the seeds of the pickle reader's fuzz test, and ``expected.npz`` with their values.

    python scripts/make_torch_fixture.py tests/data/torch_tiny      (needs torch)

The state dict mixes float32, float16, bfloat16 and int64 tensors, a transposed (non-contiguous)
view, a slice at a storage offset, and two names sharing one storage (a tied head).
"""

import collections
import os
import sys

import numpy as np
import torch


def state_dict():
    g = torch.Generator().manual_seed(0)
    sd = collections.OrderedDict()
    sd["w.float32"] = torch.randn(4, 3, generator=g)
    sd["w.float16"] = torch.randn(5, 2, generator=g).half()
    sd["w.bfloat16"] = torch.randn(3, generator=g).bfloat16()
    sd["steps"] = torch.arange(4)
    sd["w.transposed"] = sd["w.float32"].t()
    sd["w.slice"] = sd["w.float16"][2:4]
    sd["tied"] = sd["w.float16"]
    return sd


def main(out):
    os.makedirs(out, exist_ok=True)
    sd = state_dict()
    torch.save(sd, os.path.join(out, "zip.pt"))
    torch.save(sd, os.path.join(out, "legacy.pt"), _use_new_zipfile_serialization=False)
    np.savez(os.path.join(out, "expected.npz"),
             **{k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/torch_tiny")
