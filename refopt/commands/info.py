"""``refopt info PRESET``: what a preset holds, without loading its weights.

Prints the format, the architecture (config), the parameter count, the dtype the weights are
stored in, the tokenizer, and the size on disk.  ``--json`` prints the same as one JSON object.
Everything is read through the validated loader (:mod:`refopt.io.checkpoint`): a broken preset is
an error naming the file, never a traceback.
"""

from __future__ import annotations

import json
import os


def add_parser(subparsers):
    p = subparsers.add_parser(
        "info", help="show a preset's config, parameter count, dtype and size on disk",
        description="Describe a preset (KerasHub preset, transformers checkpoint directory, "
                    "built-in name under $REFOPT_HOME, or 'bundled' for the default model) "
                    "without loading its weights.")
    p.add_argument("preset", nargs="?", default="bundled",
                   help="a preset directory or name (default: the bundled model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)
    return p


def _tokenizer(path):
    """The tokenizer's size and vocabulary file, read and checked as ``from_preset`` reads it
    (with the preprocessor)."""
    from refopt.models import OPTCausalLMPreprocessor
    from refopt.tokenizers import preset_files as pf

    if not pf.has_tokenizer(path):
        return None
    found = pf.find_tokenizer_files(path)
    tokenizer = OPTCausalLMPreprocessor.from_preset(path, compiled=False).tokenizer
    vocabulary = found["vocabulary"]
    where = (os.path.relpath(vocabulary, path) if isinstance(vocabulary, (str, os.PathLike))
             else pf.HF_TOKENIZERS_FILE)
    return {"vocabulary": where, "tokens": tokenizer.vocabulary_size()}


def loading_plan(parameters: int, stored: str | None, weights_file: str) -> dict[str, str]:
    """What ``from_preset`` will do with these weights, per ``weights_dtype`` choice."""
    n = parameters
    mappable = weights_file.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"))
    plan = {"default": f"widened to float32, tensor by tensor: {_human(4 * n)} in memory"}
    if stored in ("float16", "bfloat16") and mappable:
        plan["auto"] = (f"{stored} matrices memory-mapped from the file and used in place: no copy, "
                        f"{_human(2 * n)} of the file read as decoding needs it")
    elif stored in ("float16", "bfloat16"):
        plan["auto"] = f"{stored} matrices read into memory: {_human(2 * n)}"
    else:
        plan["auto"] = f"stored {stored}: as the default"
    plan["int8"] = f"quantised tensor by tensor: {_human(n)} in memory"
    plan["int8+int8"] = ("with weights_dtype='int8': each product's activations quantised per row too "
                         "(integer products: faster, not exact)")
    return plan


def describe(preset) -> dict:
    """The facts ``refopt info`` prints, as a dict."""
    from refopt.io import checkpoint, preset_layout, presets

    path = presets.bundled_preset_dir() if preset in (None, "bundled") else presets.resolve(preset)
    with checkpoint.open_checkpoint(path) as ckpt:
        cfg = ckpt.config
        dtypes = ckpt.stored_dtypes()
        fmt = ckpt.format
        weights = [p.name for p in ckpt.weight_files]
    ours, _ = preset_layout.list_preset_files(path)
    sizes = [os.stat(path / rel).st_size for rel in ours]
    return {
        "path": str(path),
        "format": presets.layout_label(cfg, fmt),
        "config": cfg.backbone_kwargs(),
        "parameters": cfg.parameter_count(),
        "stored_dtype": max(dtypes, key=dtypes.get) if dtypes else None,
        "stored_dtypes": dtypes,
        "weights_file": weights[0] if len(weights) == 1 else f"{len(weights)} shards",
        "loading": loading_plan(cfg.parameter_count(), max(dtypes, key=dtypes.get) if dtypes else None,
                                weights[0]),
        "tokenizer": _tokenizer(path),
        "files": len(sizes),
        "size_bytes": sum(sizes),
    }


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def run(args) -> int:
    info = describe(args.preset)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    lines = [f"preset      {info['path']}",
             f"format      {info['format']}",
             f"parameters  {info['parameters']:,}",
             "dtype       " + (info["stored_dtype"] or "?") + " (stored)"
             + ("" if len(info["stored_dtypes"]) < 2 else
                "; " + ", ".join(f"{n} tensors {d}" for d, n in info["stored_dtypes"].items())),
             f"size        {_human(info['size_bytes'])} on disk ({info['files']} files)"]
    lines.append(f"weights     {info['weights_file']}")
    for choice, what in info["loading"].items():
        label = ("weights_dtype=None" if choice == "default" else
                 "activations='int8'" if choice == "int8+int8" else f"weights_dtype={choice!r}")
        lines.append(f"  {label:26s}{what}")
    if info["tokenizer"]:
        lines.append(f"tokenizer   {info['tokenizer']['tokens']:,} tokens ({info['tokenizer']['vocabulary']})")
    else:
        lines.append("tokenizer   none (token ids only)")
    lines.append("config")
    width = max(len(k) for k in cfg)
    lines += [f"  {k.ljust(width)}  {'float32 (default)' if k == 'dtype' and v is None else v}"
              for k, v in cfg.items()]
    print("\n".join(lines))
    return 0
