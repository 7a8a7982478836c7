"""``refopt info PRESET``: what a preset holds, without loading its weights.

Prints the format, the architecture (config), the parameter count, the dtype the weights are
stored in, the tokenizer, and the size on disk.  ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path


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


def _stored_dtypes(path: Path, fmt: str) -> dict[str, int]:
    """dtype name -> number of tensors stored in it (headers only, no tensor data read)."""
    from refopt.errors import CheckpointError

    counts: dict[str, int] = {}
    if fmt == "keras":
        import h5py

        try:
            with h5py.File(path / "model.weights.h5", "r") as f:
                def visit(_, obj):
                    if isinstance(obj, h5py.Dataset):
                        counts[str(obj.dtype)] = counts.get(str(obj.dtype), 0) + 1
                f.visititems(visit)
        except OSError as e:
            raise CheckpointError(f"{path / 'model.weights.h5'}: not a readable HDF5 file ({e})") from None
        return counts
    from refopt.io import presets, safetensors_io, stored

    if not presets.hf_weights_file(path).name.startswith("model.safetensors"):
        for value in presets._hf_state(path).values():      # mapped: no tensor data read
            dtype = stored.stored_dtype_name(value)
            counts[dtype] = counts.get(dtype, 0) + 1
        return counts
    index = path / "model.safetensors.index.json"
    files = ([path / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
             if index.exists() else [path / "model.safetensors"])
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
    for file in files:
        header, _ = safetensors_io.read_header(file)
        for key, meta in header.items():
            if key != "__metadata__":
                dtype = names.get(meta["dtype"], meta["dtype"])
                counts[dtype] = counts.get(dtype, 0) + 1
    return counts


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
    return plan


def describe(preset) -> dict:
    """The facts ``refopt info`` prints, as a dict."""
    from refopt.io import presets

    path = presets.bundled_preset_dir() if preset in (None, "bundled") else presets.resolve(preset)
    fmt = presets.detect_format(path)
    cfg = presets.read_config(path)
    files = [p for p in path.rglob("*") if p.is_file()]
    tokenizer = None
    for vocab in (path / "vocab.json", path / "assets" / "tokenizer" / "vocabulary.json"):
        if vocab.exists():
            tokenizer = {"vocabulary": str(vocab.relative_to(path)),
                         "tokens": len(json.loads(vocab.read_text(encoding="utf-8")))}
            break
    dtypes = _stored_dtypes(path, fmt)
    weights = presets.hf_weights_file(path).name if fmt == "huggingface" else "model.weights.h5"
    return {
        "path": str(path),
        "format": {"keras": "KerasHub preset", "huggingface": "transformers checkpoint"}[fmt],
        "config": cfg.backbone_kwargs(),
        "parameters": cfg.parameter_count(),
        "stored_dtype": max(dtypes, key=dtypes.get) if dtypes else None,
        "stored_dtypes": dtypes,
        "weights_file": weights,
        "loading": loading_plan(cfg.parameter_count(), max(dtypes, key=dtypes.get) if dtypes else None,
                                weights),
        "tokenizer": tokenizer,
        "files": len(files),
        "size_bytes": sum(p.stat().st_size for p in files),
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
        label = "weights_dtype=None" if choice == "default" else f"weights_dtype={choice!r}"
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
