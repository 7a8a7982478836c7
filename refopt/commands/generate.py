"""``refopt generate "prompt"``: stream text from a model as it is produced.

The prompt is printed, then each piece of text as soon as its tokens are decoded (a multi-byte
character appears once its bytes are complete).

Backend: ``--backend``, else ``REFOPT_BACKEND``, else the fastest available.  With Numba, the
kernels compile (on a fresh install) or load from Numba's cache on a background thread while the
NumPy ops produce the first tokens (:func:`refopt.generation.prepare`), so text appears at once;
if the compilation outlasts the generation, the command says so on stderr and finishes it, so the
next run starts at full speed.

The default model is the bundled one (``data/refopt_shakespeare``); ``--preset`` takes a KerasHub
preset, a transformers checkpoint directory or a built-in name (``opt_125m_en`` ... under
``REFOPT_HOME``).
"""

from __future__ import annotations

import itertools
import os
import sys

SAMPLERS = ("greedy", "random", "top_k", "top_p", "min_p", "typical", "beam", "contrastive")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "generate", help="generate text from a prompt, streaming it as it is produced",
        description="Generate text from a prompt and stream it to stdout as tokens are produced.")
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--preset", default=None,
                   help="a KerasHub preset or transformers checkpoint directory, or a built-in name "
                        "such as opt_125m_en looked up under $REFOPT_HOME (default: the bundled "
                        "refopt_shakespeare model)")
    p.add_argument("--sampler", choices=SAMPLERS, default="top_k",
                   help="how the next token is chosen (default: %(default)s, as KerasHub)")
    p.add_argument("--max-length", type=int, default=128, metavar="N",
                   help="total length in tokens, prompt included (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="divide the logits by T before sampling (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="keep the K likeliest tokens (top_k: default 5; contrastive: default 5; "
                        "top_p: optional pre-filter)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="keep the smallest set of tokens whose probability reaches P (top_p: "
                        "default 0.9; typical: default 0.9; min_p: the minimum ratio, default 0.05)")
    p.add_argument("--num-beams", type=int, default=5, metavar="N",
                   help="beams for --sampler beam (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the random samplers; the same seed gives the same text")
    p.add_argument("--backend", choices=("auto", "numpy", "numba", "cuda"), default=None,
                   help="compute backend (default: REFOPT_BACKEND or the fastest available; cuda "
                        "under NUMBA_ENABLE_CUDASIM=1 is a simulator, for tests only)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="compute dtype (default: the preset's)")
    p.add_argument("--weights-dtype", choices=("auto", "float32", "float16", "bfloat16", "int8"),
                   default="auto",
                   help="how the weights are held (default auto: as the checkpoint stores them, a float16 "
                        "file memory-mapped without a copy; int8 quarters float32's memory)")
    p.add_argument("--activations", choices=("int8",), default=None,
                   help="with --weights-dtype int8: quantise each product's activations per row and "
                        "multiply in integers (CTranslate2's int8 compute; faster, not exact; default: "
                        "float activations, exact)")
    p.add_argument("--no-echo", action="store_true", help="print only the generated text")
    p.set_defaults(run=run)
    return p


def make_sampler(name, temperature=1.0, top_k=None, top_p=None, seed=None, num_beams=5):
    """The sampler object the command line names; unused options raise a ConfigError."""
    from refopt import samplers
    from refopt.errors import ConfigError

    uses = {"greedy": (), "beam": (), "random": ("seed",), "top_k": ("top_k", "seed"),
            "top_p": ("top_p", "top_k", "seed"), "min_p": ("top_p", "seed"),
            "typical": ("top_p", "seed"), "contrastive": ("top_k",)}[name]
    for option, value in (("top_k", top_k), ("top_p", top_p), ("seed", seed)):
        if value is not None and option not in uses:
            raise ConfigError(f"--{option.replace('_', '-')} does not apply to --sampler {name}")
    common = {"temperature": temperature}
    if name == "greedy":
        return samplers.GreedySampler(**common)
    if name == "random":
        return samplers.RandomSampler(seed=seed, **common)
    if name == "top_k":
        return samplers.TopKSampler(k=5 if top_k is None else top_k, seed=seed, **common)
    if name == "top_p":
        return samplers.TopPSampler(p=0.9 if top_p is None else top_p, k=top_k, seed=seed, **common)
    if name == "min_p":
        return samplers.MinPSampler(min_p=0.05 if top_p is None else top_p, seed=seed, **common)
    if name == "typical":
        return samplers.TypicalSampler(p=0.9 if top_p is None else top_p, seed=seed, **common)
    if name == "beam":
        return samplers.BeamSampler(num_beams=num_beams, **common)
    return samplers.ContrastiveSampler(k=5 if top_k is None else top_k, **common)




def run(args) -> int:
    from refopt import generation
    from refopt.commands import warn_if_simulated
    from refopt.errors import ConfigError
    from refopt.io import presets
    from refopt.models import OPTCausalLM, OPTCausalLMPreprocessor
    from refopt.tokenizers import preset_files

    sampler = make_sampler(args.sampler, args.temperature, args.top_k, args.top_p, args.seed,
                           args.num_beams)
    backend = None if args.backend in (None, "auto") else args.backend
    warn_if_simulated("generate", backend)
    path = presets.resolve(args.preset)
    # the pure-Python tokenizer: a prompt is short, and it compiles nothing
    preprocessor = (OPTCausalLMPreprocessor.from_preset(path, compiled=False)
                    if preset_files.has_tokenizer(path) else None)
    lm = OPTCausalLM.from_preset(args.preset, dtype=args.dtype, backend=backend,
                                 preprocessor=preprocessor,
                                 weights_dtype=(None if args.dtype == "float64" and args.weights_dtype == "auto"
                                                else args.weights_dtype),
                                 activations=args.activations)
    if lm.preprocessor is None:
        raise ConfigError(f"preset {args.preset}: has no tokenizer files (vocab.json and merges.txt, "
                          "or KerasHub's tokenizer assets), so text cannot be generated")
    # Numba's kernels compile (or load from its cache) in the background while the NumPy ops
    # produce the first tokens
    job = generation.prepare(lm)
    status = _stream(lm, sampler, args)
    if job is not None and not job.wait(0.5):
        print("refopt generate: finishing the compilation of the Numba kernels (once per install; "
              "later runs start at full speed; Ctrl-C skips it) ...", file=sys.stderr, flush=True)
        try:
            job.wait()
        except KeyboardInterrupt:
            pass
    return status


def _stream(lm, sampler, args) -> int:
    lm.compile(sampler=sampler)
    out = sys.stdout
    pieces = lm.stream(args.prompt, max_length=args.max_length)
    # the first piece is computed before the prompt is echoed, so a request the model refuses
    # (--max-length past its positions, an empty prompt ...) prints its error and nothing else
    first = next(pieces, "")
    try:
        if not args.no_echo:
            out.write(args.prompt)
            out.flush()
        for piece in itertools.chain([first], pieces):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    except BrokenPipeError:          # `refopt generate ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
