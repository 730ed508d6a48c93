"""`kiln fusions`: every fusion, its state on this device and where that state came from."""

from __future__ import annotations

import argparse

from kiln.cli import command
from kiln.commands.common import add_backend_args


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    add_backend_args(p)


@command("fusions", "List the fusions, their state on this device and its source.", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from kiln.fusion import FusionPolicy, parse_overrides
    from kiln.llm import pick_device
    from kiln.ops import resolve_backend

    device = pick_device(args.device)
    backend = resolve_backend(args.backend, device)
    policy = FusionPolicy.resolve(device, backend, parse_overrides(args.fusion))
    print(format_table(policy, describe_device(device), backend))
    evidence = format_evidence(policy, device)
    if evidence:
        print(evidence)
    print(format_routes(backend, dict(policy.states)))
    return 0


def format_routes(backend: str, states: dict[str, bool], weights=None) -> str:
    """What runs each op of the model's op set on this backend (decided once, at build), and
    with `weights` ({name: GGML type}) the weights whose format a kernel lacks."""
    from kiln.ops import get_ops, weight_fallbacks

    ops = get_ops(backend, states)
    width = max(len(name) for name, _ in ops.routes)
    lines = [f"ops ({backend} backend):"]
    lines += [f"  {name:<{width}}  {how}" for name, how in ops.routes]
    if weights is not None:
        slow = weight_fallbacks(backend, weights)
        if slow:
            lines.append("weights whose format no kernel reads (they run the reference):")
            lines += [f"  {name} ({qtype.name})" for name, qtype in slow]
        elif backend == "triton":
            lines.append("every weight's format has a kernel")
    return "\n".join(lines)


def format_evidence(policy, device) -> str:
    """The measurements behind each device default in force (`kiln tune --write`, or an A/B
    recorded by hand), one paragraph per fusion; "" where none is."""
    from kiln.fusion import device_entries

    entries = device_entries(device)
    used = [n for n, src in policy.sources.items() if src == "device default" and n in entries]
    if not used:
        return ""
    lines = ["evidence of the device defaults:"]
    lines += [f"  {name}: {entries[name].get('evidence', '(none recorded)')}" for name in used]
    return "\n".join(lines)


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def format_table(policy, device: str, backend: str) -> str:
    from kiln.fusion import FUSIONS

    lines = [f"device: {device}, backend: {backend}"]
    if backend == "torch":
        lines.append(
            "(the torch backend runs each fused op as its reference decomposition: only the "
            "merged weights change what runs)"
        )
    rows = [("fusion", "state", "source", "summary")]
    rows += [
        (n, "on" if policy.states[n] else "off", policy.sources[n], f.summary)
        for n, f in FUSIONS.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    lines.append("Set one with --fusion NAME=0|1 on any command that runs a model, or KILN_<NAME>.")
    return "\n".join(lines)
