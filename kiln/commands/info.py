"""`kiln info MODEL`: a readable summary of a GGUF model."""

from __future__ import annotations

import argparse
from collections import defaultdict

from kiln.cli import command
from kiln.commands.common import add_backend_args
from kiln.config import is_vocab_only
from kiln.gguf.model import GGUFModel


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a GGUF file or a known model name (e.g. smollm2-135m)")
    p.add_argument(
        "--device",
        default=None,
        help="also say what runs each op on this device (cpu, cuda, cuda:N, auto) and which "
        "weights no kernel reads",
    )
    add_backend_args(p)


HELP = "Print a summary of a GGUF model: architecture, size, types, tokenizer."


@command("info", HELP, _add_arguments)
def run(args: argparse.Namespace) -> int:
    from kiln.gguf import read_gguf
    from kiln.hub import resolve_model

    model = read_gguf(resolve_model(args.model))
    print(format_vocab_only(model) if is_vocab_only(model) else format_info(model))
    if args.device is not None and not is_vocab_only(model):
        from kiln.commands.fusions import format_routes
        from kiln.fusion import FusionPolicy, parse_overrides
        from kiln.llm import pick_device
        from kiln.ops import resolve_backend

        device = pick_device(args.device)
        backend = resolve_backend(args.backend, device)
        policy = FusionPolicy.resolve(device, backend, parse_overrides(args.fusion))
        types = {name: t.qtype for name, t in model.tensors.items()}
        print(f"on {device}:")
        print(format_routes(backend, dict(policy.states), types))
    return 0


def format_vocab_only(model: GGUFModel) -> str:
    """A vocabulary-only GGUF (llama.cpp's ggml-vocab-*.gguf): what it is and its tokenizer."""
    meta = model.metadata
    size = f" ({_bytes(model.file_size)}, GGUF v{model.version})" if model.file_size else ""
    rows = [
        ("file", model.source + size),
        ("contents", "vocabulary only: a tokenizer, no weights (it cannot be run or quantized)"),
        ("architecture", str(meta.get("general.architecture", "(none)"))),
        ("tokenizer", _tokenizer(meta, len(meta["tokenizer.ggml.tokens"]))),
        ("chat template", "yes" if "tokenizer.chat_template" in meta else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_info(model: GGUFModel) -> str:
    c = model.config
    meta = model.metadata
    rows: list[tuple[str, str]] = []
    size = f" ({_bytes(model.file_size)}, GGUF v{model.version})" if model.file_size else ""
    rows.append(("file", model.source + size))
    rows.append(("architecture", c.arch))
    rows.append(("name", c.name or "(none)"))
    rows.append(("parameters", _count(model.n_params)))
    bpw = 8 * model.tensor_bytes / max(model.n_params, 1)
    rows.append(("bits/weight", f"{bpw:.2f} ({_bytes(model.tensor_bytes)} of tensor data)"))
    rows.append(("context", f"{c.n_ctx_train} tokens (trained)"))
    head = f"{c.n_head} (kv {c.n_head_kv}), head size {c.head_dim}"
    rows.append(("layers", f"{c.n_layer}, embedding {c.n_embd}, heads {head}"))
    if c.moe:
        experts = f"{c.n_expert} ({c.n_expert_used} used), expert FFN {c.n_ff_expert}"
        rows.append(("experts", experts))
    else:
        rows.append(("FFN", str(c.n_ff)))
    scaling = c.rope_scaling.kind
    if scaling != "none":
        scaling += f" x{c.rope_scaling.factor:g} from {c.rope_scaling.original_context}"
    freqs = ", frequency factors" if c.has_rope_freqs else ""
    rows.append(("RoPE", f"base {c.rope_base:g}, {c.rope_dim} dims, scaling {scaling}{freqs}"))
    rows.append(("RMS epsilon", f"{c.rms_eps:g}"))
    rows.append(("output", "tied to token_embd" if c.tied_output else "separate output.weight"))
    rows.append(("tokenizer", _tokenizer(meta, c.n_vocab)))
    rows.append(("chat template", "yes" if "tokenizer.chat_template" in meta else "no"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("tensor types:")
    lines += _type_histogram(model)
    return "\n".join(lines)


def _tokenizer(meta: dict, n_vocab: int) -> str:
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return "none in file"
    pre = meta.get("tokenizer.ggml.pre")
    label = {"gpt2": "BPE (gpt2)", "llama": "SentencePiece (llama)"}.get(kind, kind)
    parts = [label + (f", pre-tokenizer {pre}" if pre else ""), f"vocab {n_vocab}"]
    for name in ("bos", "eos"):
        tid = meta.get(f"tokenizer.ggml.{name}_token_id")
        if tid is not None:
            parts.append(f"{name} {tid}")
    return ", ".join(parts)


def _type_histogram(model: GGUFModel) -> list[str]:
    count: dict[str, int] = defaultdict(int)
    params: dict[str, int] = defaultdict(int)
    nbytes: dict[str, int] = defaultdict(int)
    for t in model.tensors.values():
        count[t.qtype.name] += 1
        params[t.qtype.name] += t.n_elements
        nbytes[t.qtype.name] += t.nbytes
    total = max(model.n_params, 1)
    lines = []
    for name in sorted(count, key=lambda n: -nbytes[n]):
        bar = "#" * max(1, round(30 * params[name] / total))
        lines.append(
            f"  {name:<7} {count[name]:>5} tensors  {_bytes(nbytes[name]):>9}  "
            f"{100 * params[name] / total:5.1f}% of params  {bar}"
        )
    return lines


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,})"
    return f"{n:,}"
