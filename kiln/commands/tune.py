"""`kiln tune`: decide on this GPU, by measurement, the default of each fusion whose best state
depends on the GPU, and (--kernels) tune the kernels' launch configs first.

    kiln tune                                   # every tuned fusion on the standard models
    kiln tune -m synthetic:qwen3-8b:q4_k_m --fusion pdl --rounds 10
    kiln tune --write                           # ... and write this GPU's fusion defaults
    kiln tune --kernels --write                 # the mat-vec and GEMM tables first
    kiln tune -m synthetic:qwen3-0.6b:q8_0 --write   # one model now: decided with the file's
                                                     # earlier trials of the others

How a default is decided: kiln/bench/tune.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from kiln.cli import command
from kiln.errors import UsageError

# the kernel-config tuners (scripts/ of a checkout): the mat-vec (dense and MoE expert launches)
# and the GEMM with its dequantize-then-cuBLAS choice
KERNEL_TUNERS = ("tune_matvec.py", "tune_matmul.py")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m", "--model", action="append", metavar="MODEL",
        help="a model to measure (repeatable, or comma-separated; default: the five standard "
        "synthetic models)",
    )  # fmt: skip
    p.add_argument(
        "--fusion", action="append", metavar="NAME",
        help="a fusion to tune (repeatable; default: every fusion with a device-dependent "
        "default that can run here)",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, default=None, help="A/B rounds per model (default 6)")
    p.add_argument(
        "--write", action="store_true",
        help="write the decisions and their evidence into this GPU's fusion file (and keep the "
        "--kernels tables)",
    )  # fmt: skip
    p.add_argument(
        "--kernels", action="store_true",
        help="first run the kernel-config tuners of this checkout's scripts/ (mat-vec with its "
        "MoE launches, GEMM)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default)")
    p.add_argument("--backend", default="auto", help="auto (default), triton, torch or cpu")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


@command(
    "tune", "Decide this GPU's fusion defaults by measurement (and tune kernels).", _add_arguments
)
def run(args: argparse.Namespace) -> int:
    from kiln.bench import llama_bench as B
    from kiln.bench import tune as T
    from kiln.bench.models import STANDARD_MODELS
    from kiln.fusion import device_defaults_path
    from kiln.ops import resolve_backend

    rounds = args.rounds if args.rounds is not None else T.DEFAULT_ROUNDS
    if rounds < 2:
        raise UsageError(f"--rounds must be >= 2 (a verdict needs two rounds), got {rounds}")
    models = [m for v in args.model or STANDARD_MODELS for m in v.split(",") if m]
    device = B.pick_device(args.device)
    if device.type != "cuda" and not args.model:
        raise UsageError(
            "kiln tune decides a GPU's defaults, and this run is on the CPU: give -m MODEL for a "
            "trial run here (its decisions cannot be written)"
        )
    backend = resolve_backend(args.backend, device)
    fusions = T.tunable([n.replace("-", "_") for n in args.fusion or ()], device, backend)
    if args.write and device.type != "cuda":
        raise UsageError("the fusion defaults are per GPU model: --write needs a CUDA device")
    if args.kernels:
        run_kernel_tuners(device, args.write)
    progress = B.Progress(quiet=args.quiet, prefix="tune")
    print(
        f"kiln tune: {', '.join(fusions)} on {len(models)} model(s), {rounds} rounds each, "
        f"{device} ({backend})",
        flush=True,
    )
    decisions = T.run_tune(models, fusions, rounds, args.device, args.backend, progress)
    if args.write:
        gpu = T.device_record(device)
        path = device_defaults_path(gpu["name"])
        decisions = [T.with_earlier(d, T.earlier_trials(path, d.fusion)) for d in decisions]
    for d in decisions:
        models_seen = ", ".join(t.model for t in d.trials)
        state = f"{'on' if d.on else 'off'}{' (flipped)' if d.flipped else ''}"
        print(f"{d.fusion}: {state}, decided over {models_seen}")
    if args.write:
        T.write_device_file(decisions, gpu, path)
        print(f"kiln tune: wrote {path}")
    else:
        print("kiln tune: nothing written (--write keeps the decisions as this GPU's defaults)")
    return 0


def run_kernel_tuners(device, keep: bool) -> None:
    """scripts/tune_matvec.py and scripts/tune_matmul.py of this checkout, each in its own
    process with its progress on this terminal; their tables go to kernels/configs with
    --write, else to a temporary folder that is removed after."""
    if device.type != "cuda":
        raise UsageError("--kernels times kernels on a GPU: run it on a CUDA device")
    scripts = Path(__file__).resolve().parents[2] / "scripts"
    missing = [s for s in KERNEL_TUNERS if not (scripts / s).is_file()]
    if missing:
        raise UsageError(
            f"--kernels runs {', '.join(KERNEL_TUNERS)} from a checkout's scripts/ folder, and "
            f"{scripts} has no {', '.join(missing)}: run it from a git checkout of Kiln"
        )
    with tempfile.TemporaryDirectory(prefix="kiln-tune-") as tmp:
        for script in KERNEL_TUNERS:
            cmd = [sys.executable, str(scripts / script)] + ([] if keep else ["--out", tmp])
            print(f"kiln tune: {' '.join(cmd[1:])}", flush=True)
            done = subprocess.run(cmd, check=False)
            if done.returncode != 0:
                raise UsageError(f"{script} failed (exit status {done.returncode}): see above")
        if not keep:
            print("kiln tune: kernel tables not kept (--write keeps them in kernels/configs)")
