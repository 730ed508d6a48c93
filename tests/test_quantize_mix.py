"""llama.cpp's type mixes (kiln.quantize) and `kiln quantize`, checked against llama-quantize."""

from __future__ import annotations

import functools
import re
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kiln.cli import main
from kiln.errors import UnsupportedError, UsageError
from kiln.gguf import GGUFModel, RawTensor, read_gguf
from kiln.gguf.lazy import LazyRawTensor
from kiln.gguf.synthetic import PRESETS, build_model, lazy_model, plan_tensors
from kiln.gguf.writer import write_gguf
from kiln.quantize import (
    TYPE_FALLBACK,
    MixContext,
    fallback_type,
    fallbacks,
    mix_types,
    parse_mix,
    quantize_model,
    tensor_type,
    use_more_bits,
    valid_type_names,
)

Q = GGMLQuantizationType
MIXES = ["q4_k_m", "q5_k_m", "q4_k_s", "q5_k_s", "q6_k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
K_MIXES = ["q4_k_m", "q5_k_m", "q4_k_s", "q6_k", "q4_0"]  # the rules that look at layers/shapes


def histogram(types) -> dict[str, int]:
    return dict(Counter(t.name for t in types))


# --------------------------------------------------------------------------------------------
# the rules


def test_use_more_bits_layers_of_a_32_layer_model():
    more = [i for i in range(32) if use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_llama3_8b_q4_k_m_has_the_published_type_counts():
    # llama.cpp's load log of Meta-Llama-3-8B Q4_K_M: f32 65, q4_K 193, q6_K 33 tensors.
    specs = plan_tensors("llama3-8b", "q4_k_m")
    assert histogram(s.qtype for s in specs) == {"F32": 65, "Q4_K": 193, "Q6_K": 33}
    types = {s.name: s.qtype for s in specs}
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    assert types["blk.0.attn_v.weight"] == Q.Q6_K and types["blk.4.attn_v.weight"] == Q.Q4_K
    assert types["blk.6.ffn_down.weight"] == Q.Q6_K and types["blk.7.ffn_down.weight"] == Q.Q4_K


CTX = MixContext("llama", n_layer=32)


@pytest.mark.parametrize(
    "mix, name, shape, expected",
    [
        ("q4_k_m", "output.weight", (1000, 4096), Q.Q6_K),
        ("q8_0", "output.weight", (1000, 4096), Q.Q8_0),
        ("q4_0", "output.weight", (1000, 4096), Q.Q6_K),
        ("q4_0", "output.weight", (1000, 576), Q.Q8_0),  # Q6_K would need rows of 256
        ("q4_0", "token_embd.weight", (1000, 4096), Q.Q4_0),
        ("q4_k_m", "blk.5.attn_v.weight", (1024, 4096), Q.Q4_K),
        ("q4_k_m", "blk.6.attn_v.weight", (1024, 4096), Q.Q6_K),
        ("q5_k_m", "blk.31.ffn_down.weight", (4096, 14336), Q.Q6_K),
        ("q4_k_s", "blk.3.attn_v.weight", (1024, 4096), Q.Q5_K),
        ("q4_k_s", "blk.4.attn_v.weight", (1024, 4096), Q.Q4_K),
        ("q4_k_m", "blk.5.attn_q.weight", (896, 896), Q.Q5_0),  # rows of 896: fallback
        ("q5_k_m", "blk.5.attn_q.weight", (896, 896), Q.Q5_1),
        ("q6_k", "blk.5.attn_q.weight", (896, 896), Q.Q8_0),
        ("q4_k_m", "blk.0.attn_norm.weight", (4096,), Q.F32),
        ("q4_k_m", "blk.0.attn_q_norm.weight", (128,), Q.F32),
        ("q4_k_m", "blk.0.attn_q.bias", (4096,), Q.F32),
        ("q4_k_m", "blk.0.ffn_gate_inp.weight", (128, 2048), Q.F32),
        ("q4_k", "output.weight", (1000, 4096), Q.Q4_K),  # a plain type: every tensor
        ("f16", "token_embd.weight", (1000, 4096), Q.F16),
        ("f16", "blk.0.attn_norm.weight", (4096,), Q.F32),
    ],
)
def test_tensor_type(mix, name, shape, expected):
    assert tensor_type(mix, name, shape, CTX) == expected


def test_tied_embeddings_get_the_output_type():
    tied = MixContext("qwen3", n_layer=28, tied_output=True)
    assert tensor_type("q4_k_m", "token_embd.weight", (151936, 1024), tied) == Q.Q6_K
    assert tensor_type("q4_k_m", "token_embd.weight", (151936, 896), tied) == Q.Q8_0


def test_non_quantizable_tensors_keep_their_type():
    assert tensor_type("q8_0", "blk.0.ffn_gate_inp.weight", (8, 256), CTX, Q.F16) == Q.F16
    assert tensor_type("q8_0", "blk.0.ffn_norm.weight", (256,), CTX, Q.F16) == Q.F16


def test_eight_expert_models_get_more_bits_in_attention():
    moe8 = MixContext("qwen3moe", n_layer=48, n_expert=8)
    assert tensor_type("q4_k_m", "blk.9.attn_v.weight", (512, 2048), moe8) == Q.Q8_0
    assert tensor_type("q4_k_m", "blk.9.attn_k.weight", (512, 2048), moe8) == Q.Q8_0
    assert tensor_type("q4_k_m", "blk.9.attn_output.weight", (2048, 4096), moe8) == Q.Q5_K
    assert tensor_type("q5_k_m", "blk.9.attn_output.weight", (2048, 4096), moe8) == Q.Q5_K


def test_moe_expert_tensors_follow_their_layer():
    moe = MixContext("qwen3moe", n_layer=48, n_expert=128)
    shape = (128, 2048, 768)
    assert tensor_type("q4_k_m", "blk.0.ffn_down_exps.weight", shape, moe) == Q.Q6_K
    assert tensor_type("q4_k_m", "blk.7.ffn_down_exps.weight", shape, moe) == Q.Q4_K
    assert tensor_type("mxfp4_moe", "blk.7.ffn_up_exps.weight", (128, 768, 2048), moe) == Q.MXFP4
    assert tensor_type("mxfp4_moe", "blk.7.attn_q.weight", (4096, 2048), moe) == Q.Q8_0


def test_pure_gives_every_weight_the_main_type():
    mix = parse_mix("q5_0", pure=True)
    assert tensor_type(mix, "output.weight", (1000, 4096), CTX) == Q.Q5_0
    assert tensor_type(mix, "blk.0.attn_norm.weight", (4096,), CTX) == Q.F32


# rows of 64 (block 32, not 256), 48 (block 16 only) and 172 (4 x 43: no block at all)
@pytest.mark.parametrize("qtype", sorted(TYPE_FALLBACK, key=lambda q: q.name))
def test_the_fallback_table(qtype):
    fallback = TYPE_FALLBACK[qtype]
    assert fallback_type((8, 512), qtype) == qtype  # rows of 256s: no fallback
    assert fallback_type((8, 64), qtype) == fallback
    assert fallback_type((8, 172), qtype) == Q.F16  # the fallback does not fit either


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.MXFP4])
def test_types_with_no_smaller_block_fall_back_to_f16(qtype):
    assert fallback_type((8, 64), qtype) == qtype
    assert fallback_type((8, 48), qtype) == Q.F16
    if qtype.name.lower() in valid_type_names():
        assert tensor_type(qtype.name.lower(), "blk.0.attn_q.weight", (48, 48), CTX) == Q.F16


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16])
def test_float_types_store_any_row(qtype):
    assert fallback_type((3, 7), qtype) == qtype


def test_each_fallback_is_warned_once(tiny_f32):
    odd = _with_rows_of(tiny_f32, "blk.0.ffn_down.weight", 172)
    assert fallbacks("q8_0", tiny_f32) == []
    lines = fallbacks("q8_0", odd)
    assert lines == [
        "warning: blk.0.ffn_down.weight: rows of 172 values are not a multiple of 32 (required "
        "by Q8_0): falling back to F16 (an unusual shape)"
    ]
    assert fallbacks("q6_k", odd)[0].endswith("falling back to F16 (Q8_0 does not fit either)")
    warned: list[str] = []
    quantized = quantize_model(odd, "q8_0", warn=warned.append)
    n = len(odd.tensors)
    assert warned == lines + [f"warning: 1 of {n} tensor(s) required fallback quantization"]
    assert quantized.tensors["blk.0.ffn_down.weight"].qtype == Q.F16
    assert quantized.tensors["blk.1.ffn_down.weight"].qtype == Q.Q8_0
    warned.clear()
    quantize_model(odd, "q8_0", warn=None)
    assert warned == []


def _with_rows_of(model: GGUFModel, name: str, n: int) -> GGUFModel:
    """model with tensor `name` replaced by a random F32 one whose rows hold n values."""
    t = model.tensors[name]
    values = torch.randn(t.shape[0], n)
    tensors = dict(model.tensors)
    data = values.contiguous().view(torch.uint8)
    tensors[name] = RawTensor(name, Q.F32, (t.shape[0], n), data)
    return GGUFModel(dict(model.metadata), tensors, dict(model.metadata_types))


def test_parse_mix():
    assert parse_mix("Q4_K_M").ftype == 15 and not parse_mix("q4_k_m").pure
    assert parse_mix("q4_k").pure and parse_mix("q4_k").default == Q.Q4_K
    assert parse_mix("f16").ftype == 1
    with pytest.raises(UsageError, match=r"unknown quantization type 'q3'.*q8_0.*q4_k_m"):
        parse_mix("q3")
    names = valid_type_names()
    assert names[:4] == ["f32", "f16", "bf16", "q8_0"] and "q4_k" in names


# --------------------------------------------------------------------------------------------
# quantize_model


@pytest.fixture(scope="module")
def tiny_f32() -> GGUFModel:
    return build_model("tiny-llama", "f32")


def test_quantize_model_is_lazy_and_follows_the_mix(tiny_f32, tmp_path):
    quantized = quantize_model(tiny_f32, "q4_k_m")
    assert quantized.metadata["general.file_type"] == 15
    assert quantized.metadata["general.quantization_version"] == 2
    expected = mix_types("q4_k_m", tiny_f32)
    for name, t in quantized.tensors.items():
        assert t.qtype == expected[name], name
        if t.qtype == tiny_f32.tensors[name].qtype:
            assert t is tiny_f32.tensors[name]  # passed through, not copied
        else:
            assert isinstance(t, LazyRawTensor)
    path = tmp_path / "q.gguf"
    write_gguf(quantized, path, progress=False)
    back = read_gguf(path)
    assert back.config == tiny_f32.config
    for name, t in back.tensors.items():
        before = tiny_f32.tensors[name].dequantize()
        err = (t.dequantize() - before).pow(2).mean().sqrt() / before.pow(2).mean().sqrt()
        assert err < 0.1 if t.qtype != Q.F32 else err == 0, (name, t.qtype, err)


def test_requantizing_a_quantized_model(tiny_f32):
    q8 = quantize_model(tiny_f32, "q8_0")
    q4 = quantize_model(q8, "q4_0")
    w = q4.tensors["blk.0.ffn_up.weight"]
    assert w.qtype == Q.Q4_0
    before = tiny_f32.tensors["blk.0.ffn_up.weight"].dequantize()
    assert (w.dequantize() - before).abs().max() < 0.05


def _with_unreadable_tensor(model: GGUFModel) -> GGUFModel:
    """model plus a 2-D IQ2_XXS tensor (a type Kiln cannot dequantize)."""
    raw = torch.zeros(4, 66, dtype=torch.uint8)  # 4 rows of one 256-value block (66 bytes)
    tensors = dict(model.tensors)
    tensors["extra.weight"] = RawTensor("extra.weight", Q.IQ2_XXS, (4, 256), raw)
    return GGUFModel(dict(model.metadata), tensors, dict(model.metadata_types))


def test_a_type_kiln_cannot_read_is_refused_up_front(tiny_f32):
    with pytest.raises(UnsupportedError, match="'extra.weight' is IQ2_XXS, which Kiln cannot"):
        quantize_model(_with_unreadable_tensor(tiny_f32), "q8_0")


# --------------------------------------------------------------------------------------------
# the command


def test_quantize_command(tiny_f32, tmp_path, capsys):
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_gguf(tiny_f32, src, progress=False)
    assert main(["quantize", str(src), str(out), "--type", "q4_0", "--quiet"]) == 0
    result = read_gguf(out)
    assert {n: t.qtype for n, t in result.tensors.items()} == mix_types("q4_0", tiny_f32)
    assert result.metadata["general.file_type"] == 2
    assert "wrote" in capsys.readouterr().err


def test_quantize_command_errors(tiny_f32, tmp_path, capsys):
    src = tmp_path / "in.gguf"
    write_gguf(tiny_f32, src, progress=False)
    bad = tmp_path / "bad.gguf"
    write_gguf(_with_unreadable_tensor(tiny_f32), bad, progress=False)
    cases = [
        ([str(src), str(src), "--type", "q8_0"], "is the input file; write the result to another"),
        ([str(tmp_path / "nope.gguf"), str(tmp_path / "o.gguf"), "--type", "q8_0"],
         "nope.gguf: no such file"),
        ([str(src), str(tmp_path / "o.gguf"), "--type", "q7_k"],
         "unknown quantization type 'q7_k'; valid types: f32, f16"),
        ([str(bad), str(tmp_path / "o.gguf"), "--type", "q8_0"], "IQ2_XXS, which Kiln cannot"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(["quantize", *argv, "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("kiln quantize: error:") and message in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "o.gguf").exists()
    assert read_gguf(src).tensors.keys() == tiny_f32.tensors.keys()  # input untouched


# --------------------------------------------------------------------------------------------
# llama-quantize gives every tensor the same type


_PLAN_LINE = re.compile(
    r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =[^(]*(?:\((\w+)\))?\s*$"
)


def llama_quantize_types(peer: Path, src: Path, mix: str) -> dict[str, GGMLQuantizationType]:
    """The type llama-quantize gives each tensor (--dry-run: nothing is written)."""
    run = subprocess.run(
        [str(peer), "llama-quantize", "--dry-run", "--allow-requantize", str(src), mix.upper()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    types = {}
    for line in (run.stdout + run.stderr).splitlines():
        m = _PLAN_LINE.match(line)
        if m:
            types[m.group(1)] = Q[(m.group(3) or m.group(2)).upper()]
    return types


def assert_same_types(peer: Path, path: Path, mixes: list[str]) -> None:
    model = read_gguf(path)
    for mix in mixes:
        theirs = llama_quantize_types(peer, path, mix)
        ours = mix_types(mix, model)
        assert theirs.keys() == ours.keys()
        wrong = {n: (theirs[n].name, ours[n].name) for n in ours if theirs[n] != ours[n]}
        assert not wrong, f"{path.name} {mix}: (llama.cpp, kiln) {wrong}"


# Shapes that exercise every rule: real layer counts (use_more_bits), 8 experts, the 70B rule,
# rows that are not multiples of 256 (fallbacks), tied and untied outputs, MoE.
VARIANTS = {
    "tiny-llama": PRESETS["tiny-llama"],
    "tiny-qwen2": PRESETS["tiny-qwen2"],
    "tiny-qwen3": PRESETS["tiny-qwen3"],
    "tiny-qwen3moe": PRESETS["tiny-qwen3moe"],
    "llama-32-layers": replace(PRESETS["tiny-llama"], n_layer=32),
    "llama-80-layers-gqa": replace(PRESETS["tiny-llama"], n_layer=80),
    "qwen3-36-layers": replace(PRESETS["tiny-qwen3"], n_layer=36),
    "qwen3moe-8-experts-48-layers": replace(PRESETS["tiny-qwen3moe"], n_layer=48, n_expert=8),
    "qwen2-rows-of-288": replace(PRESETS["tiny-qwen2"], n_layer=24, n_embd=288, n_head=3,
                                 n_head_kv=1, head_dim=96, n_ff=480),
}  # fmt: skip


def zero_weights_file(preset, path: Path) -> Path:
    """An F16 file of the preset (norms F32, as converted models have) with all-zero weights:
    llama-quantize --dry-run only looks at names, shapes and types, and zeros cost nothing."""
    model = lazy_model(preset, "f16")
    for name, t in model.tensors.items():
        zeros = functools.partial(torch.zeros, t.nbytes, dtype=torch.uint8)
        model.tensors[name] = LazyRawTensor(name, t.qtype, t.shape, zeros)
    write_gguf(model, path, progress=False)
    return path


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mix_types_match_llama_quantize(peer_cpu: Path, tmp_path, variant):
    path = zero_weights_file(VARIANTS[variant], tmp_path / "in.gguf")
    assert_same_types(peer_cpu, path, MIXES if variant.startswith("tiny") else K_MIXES)
    # make-model's types are the same rules
    planned = {s.name: s.qtype for s in plan_tensors(VARIANTS[variant], "q4_k_m")}
    assert planned == mix_types("q4_k_m", read_gguf(path))


def test_mix_types_match_llama_quantize_on_the_demo_model(peer_cpu: Path, demo_model: Path):
    assert_same_types(peer_cpu, demo_model, ["q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0"])


_WARNING = re.compile(r"^warning: (\S+)\s+- ncols .* -> falling back to\s+(\w+)$")


@pytest.mark.parametrize(
    "mix", ["q8_0", "q4_0", "q5_1", "q4_k_m", "q5_k_s", "q6_k", "q4_k_m --pure", "q6_k --pure"]
)
def test_quantize_falls_back_as_llama_quantize_does(peer_cpu, stories_model, tmp_path, mix, capsys):
    """stories260K: rows of 64 (not K-quants) and a 172-wide ffn_down (no quantized type):
    the type of every tensor and the tensors llama-quantize warns about, both as llama.cpp's."""
    mix, *pure = mix.split()
    run = subprocess.run(
        [str(peer_cpu), "llama-quantize", "--dry-run", *pure, str(stories_model), mix.upper()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = (run.stdout + run.stderr).splitlines()
    theirs = {m[1]: Q[(m[3] or m[2]).upper()] for m in map(_PLAN_LINE.match, lines) if m}
    theirs_warned = {m[1]: Q[m[2].upper()] for m in map(_WARNING.match, lines) if m}
    out = tmp_path / "out.gguf"
    argv = ["quantize", str(stories_model), str(out), "--type", mix, *pure, "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    ours = {n: t.qtype for n, t in read_gguf(out).tensors.items()}
    assert ours == theirs
    *per_tensor, count, wrote = err.splitlines()  # nothing else on stderr
    warned = [line.split(":")[1].strip() for line in per_tensor]
    assert {name: ours[name] for name in warned} == theirs_warned and warned
    assert count == f"warning: {len(warned)} of 48 tensor(s) required fallback quantization"
    assert wrote.startswith("wrote ")


def test_llama_cpp_runs_what_kiln_quantize_writes(peer_cpu: Path, demo_model: Path, tmp_path):
    tiny = tmp_path / "tiny.gguf"
    write_gguf(build_model("tiny-qwen3moe", "f16"), tiny, progress=False)
    outputs = []
    for src, mix in [(demo_model, "q8_0"), (tiny, "q4_k_m")]:
        out = tmp_path / f"{src.stem}-{mix}.gguf"
        assert main(["quantize", str(src), str(out), "--type", mix, "--quiet"]) == 0
        outputs += ["-m", str(out)]
    run = subprocess.run(
        [str(peer_cpu), "llama-bench", *outputs, "-p", "8", "-n", "2", "-r", "1", "-o", "csv"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.count(",") > 5][1:]
    assert len(rows) == 4  # a pp8 and a tg2 row for each file
