"""A batch of B sequences with prompts of different lengths decodes, greedily, the tokens each
sequence decodes alone (B = 1, 2, 3, 8), for every architecture's tiny model: on the reference
and cpu backends on the CPU (and the triton kernels in Triton's interpreter, one small case); on
a GPU the triton backend with CUDA graphs on and off, and the reference.

Why the tokens can be equal: every op computes each row from that row alone (mat-vecs of up to
8 rows read the weight once but sum each row in the same order as one row; attention reads
each sequence's own blocks), so a row's logits do not depend on its neighbours. Their bits can
still differ between batch sizes where a kernel's compiled variant depends on M, which is why
tokens (128 steps on a GPU) are compared, and the logits only within a tolerance.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kiln.gguf.synthetic import PRESETS
from kiln.gguf.synthetic import build_model as synthetic
from kiln.models import build_model
from kiln.runtime.engine import Engine

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
STEPS = 128 if CUDA else 12
ARCHS = [("tiny-llama", "q8_0"), ("tiny-qwen2", "q4_0"), ("tiny-qwen3", "q4_k_m"),
         ("tiny-qwen3moe", "q8_0")]  # fmt: skip
PROMPT_LENGTHS = (1, 5, 17, 64, 65, 9, 30, 2)  # block boundaries at 64 (the default block)


def _prompts(n_vocab: int, b: int) -> list[list[int]]:
    lengths = PROMPT_LENGTHS[:b]
    return [[(7 * i + 13 * j + 1) % n_vocab for j in range(n)] for i, n in enumerate(lengths)]


def _alone(engine: Engine, prompt: list[int], steps: int) -> list[int]:
    seq = engine.new_sequence()
    logits = engine.prefill(prompt, seq)
    out = []
    for _ in range(steps):
        out.append(int(torch.argmax(logits[-1])))
        logits = engine.decode(out[-1], seq)
    seq.free()
    return out


def _batched(engine: Engine, prompts: list[list[int]], steps: int) -> list[list[int]]:
    seqs = [engine.new_sequence() for _ in prompts]
    logits = torch.cat([engine.prefill(p, s) for p, s in zip(prompts, seqs)])
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        tokens = [int(t) for t in torch.argmax(logits, dim=-1)]
        for row, t in zip(out, tokens):
            row.append(t)
        logits = engine.decode_batch(tokens, seqs)
    for s in seqs:
        s.free()
    return out


def _batched_on_device(engine: Engine, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """_batched with each step's ids handed over on the device (as the server's overlapped
    loop does), read back only at the end."""
    seqs = [engine.new_sequence() for _ in prompts]
    logits = torch.cat([engine.prefill(p, s) for p, s in zip(prompts, seqs)])
    picked = []
    for _ in range(steps):
        tokens = torch.argmax(logits, dim=-1)
        picked.append(tokens)
        logits = engine.decode_batch(tokens, seqs)
    for s in seqs:
        s.free()
    return torch.stack(picked, 1).tolist()


def _engine(gguf, backend: str, graphs: bool = True, n_seq: int = 8) -> Engine:
    model = build_model(gguf, DEVICE, backend=backend, fusions={"cuda_graphs": graphs})
    return Engine(model, n_ctx=max(PROMPT_LENGTHS) + STEPS + 1, n_seq=n_seq)


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: f"{a[0]}-{a[1]}")
def tiny(request):
    return synthetic(request.param[0], request.param[1], device=DEVICE)


BACKENDS = [("torch", True)] + ([("triton", True), ("triton", False)] if CUDA else [("cpu", True)])


@pytest.mark.parametrize(("backend", "graphs"), BACKENDS, ids=lambda v: str(v))
def test_batch_decodes_what_each_sequence_decodes_alone(tiny, backend, graphs):
    engine = _engine(tiny, backend, graphs)
    prompts = _prompts(tiny.config.n_vocab, 8)
    alone = [_alone(engine, p, STEPS) for p in prompts]
    for b in (1, 2, 3, 8):
        assert _batched(engine, prompts[:b], STEPS) == alone[:b], f"B={b}"


@pytest.mark.parametrize(("backend", "graphs"), BACKENDS, ids=lambda v: str(v))
def test_ids_on_the_device_decode_what_ids_on_the_host_decode(backend, graphs):
    """decode_batch with the ids as a device tensor (graph replay and eager), and a negative id
    (a broken row's) decoding as 0."""
    gguf = synthetic("tiny-qwen3", "q8_0", device=DEVICE)
    engine = _engine(gguf, backend, graphs)
    prompts = _prompts(gguf.config.n_vocab, 8)
    for b in (1, 3):
        host = _batched(engine, prompts[:b], STEPS)
        assert _batched_on_device(engine, prompts[:b], STEPS) == host, f"B={b}"
    seqs = [engine.new_sequence() for _ in range(2)]
    twins = [engine.new_sequence() for _ in range(2)]
    for s in seqs + twins:
        engine.prefill(prompts[1], s)
    negative = engine.decode_batch(torch.tensor([-1, 5], device=DEVICE), seqs).clone()
    assert torch.equal(negative, engine.decode_batch([0, 5], twins))


def test_triton_kernels_batch_in_the_interpreter():
    """The triton backend's batched decode (paged attention, mat-vecs of 3 rows, per-row MoE
    routing) in Triton's interpreter: one layer, 3 sequences, 2 steps."""
    if CUDA:
        pytest.skip("the GPU runs the full test above")
    micro = dataclasses.replace(
        PRESETS["tiny-qwen3moe"], name="micro-qwen3moe", n_layer=1, n_embd=64, n_head=2,
        n_head_kv=1, head_dim=32, n_ff=64, n_ff_expert=32,
    )  # fmt: skip
    gguf = synthetic(micro, "q8_0")
    engine = Engine(build_model(gguf, "cpu", backend="triton"), n_ctx=80, n_seq=3)
    prompts = [[1, 2], [3, 4, 5, 6, 7], [9]]
    alone = [_alone(engine, p, 2) for p in prompts]
    assert _batched(engine, prompts, 2) == alone


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_graph_buckets_pad_rows_without_touching_the_sequences():
    """B = 3 and 5 run the buckets of 4 and 8 with padded rows; their tokens equal eager
    execution's, so the padded rows wrote nothing a sequence reads."""
    gguf = synthetic("tiny-qwen3", "q8_0", device=DEVICE)
    prompts = _prompts(gguf.config.n_vocab, 8)
    graphed, eager = _engine(gguf, "triton", True), _engine(gguf, "triton", False)
    for b in (3, 5):
        assert _batched(graphed, prompts[:b], 64) == _batched(eager, prompts[:b], 64)
        assert graphed.graphs.bucket(b) in graphed.graphs._graphs
    # (the bucket of 4 may be gone: a pool that grows drops every graph captured on its tensors)
    assert (graphed.graphs.bucket(3), graphed.graphs.bucket(5)) == (4, 8)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_graph_buckets_above_eight_rows():
    """Batches of 9 and 20 rows of a dense model replay the graphs of 16 and 32 (captured, not
    failed) and decode what eager execution decodes."""
    gguf = synthetic("tiny-qwen3", "q4_k_m", device=DEVICE)
    n_vocab = gguf.config.n_vocab
    prompts = [[(5 * i + 3 * j + 2) % n_vocab for j in range(1 + (7 * i) % 40)] for i in range(20)]
    graphed = _engine(gguf, "triton", True, n_seq=32)
    eager = _engine(gguf, "triton", False, n_seq=32)
    assert graphed.graphs.buckets == (1, 2, 4, 8, 16, 32)
    for b in (9, 20):
        assert _batched(graphed, prompts[:b], 32) == _batched(eager, prompts[:b], 32), f"B={b}"
        assert graphed.graphs.bucket(b) in graphed.graphs._graphs
    assert graphed.graphs.failed == {}


def test_graph_buckets_by_model():
    """Buckets up to the first that holds n_seq; a MoE model's stop at 8 rows."""
    from kiln.runtime.graphs import buckets_for

    assert buckets_for(1, False) == (1,)
    assert buckets_for(8, False) == (1, 2, 4, 8)
    assert buckets_for(9, False) == (1, 2, 4, 8, 16)
    assert buckets_for(64, False) == (1, 2, 4, 8, 16, 32, 64)
    assert buckets_for(100, False) == (1, 2, 4, 8, 16, 32, 64)  # 65..100 rows: eager
    assert buckets_for(64, True) == (1, 2, 4, 8)
    assert buckets_for(3, True) == (1, 2, 4)


def test_a_failed_capture_above_eight_rows_runs_eagerly(monkeypatch, capsys):
    """A bucket above 8 rows whose capture raises is said once on stderr and its batches run
    eagerly from then on (decode_batch gives the eager logits); at 8 rows or fewer the error
    stands (every GPU run captures those)."""
    from kiln.runtime import graphs

    def refuse(model, pool, size, mempool):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(graphs, "_Bucket", refuse)
    monkeypatch.setattr(graphs.torch.cuda, "graph_pool_handle", lambda: object())
    gguf = synthetic("tiny-qwen3", "q8_0")
    engine = _engine(gguf, "torch", True, n_seq=16)
    eager = _engine(gguf, "torch", True, n_seq=16)
    engine.graphs = graphs.GraphRunner(engine.model, engine.pool, (1, 2, 4, 8, 16))
    prompts = [[(3 * i + j) % gguf.config.n_vocab for j in range(1 + i)] for i in range(10)]
    assert _batched(engine, prompts, 3) == _batched(eager, prompts, 3)
    assert engine.graphs.failed == {
        16: "RuntimeError: operation not permitted when stream is capturing"
    }
    assert not engine.graphs.serves(10) and not engine.graphs.serves(17)
    assert capsys.readouterr().err.count("batches of 16 rows run without a CUDA graph") == 1
    with pytest.raises(RuntimeError, match="capturing"):
        _batched(engine, prompts[:3], 1)


@pytest.mark.parametrize("backend", ["torch", "cpu"] if not CUDA else ["torch", "triton"])
def test_a_mixed_step_equals_its_parts(tiny, backend):
    """One step with a decode token of one sequence beside a prompt chunk of another (and all
    logits of a third's chunk) gives each sequence the logits it gets in a step of its own."""
    engine = _engine(tiny, backend, graphs=False)
    prompts = _prompts(tiny.config.n_vocab, 3)
    chunk = [5, 6, 7, 8, 9, 10, 11]

    def run(together: bool):
        seqs = [engine.new_sequence() for _ in range(3)]
        engine.prefill(prompts[1], seqs[0])
        engine.prefill(prompts[2], seqs[1])
        entries = [(seqs[0], [42]), (seqs[1], chunk), (seqs[2], prompts[2])]
        if together:
            out = engine.step(entries, "last")
        else:
            out = torch.cat([engine.step([e], "last") for e in entries])
        lengths = [s.length for s in seqs]
        for s in seqs:
            s.free()
        return out, lengths

    (mixed, n1), (alone, n2) = run(True), run(False)
    assert n1 == n2 == [len(prompts[1]) + 1, len(prompts[2]) + len(chunk), len(prompts[2])]
    if backend == "triton" and CUDA:
        # Together the step has more than 8 rows: every row runs the quantized GEMM with bf16
        # activations, where alone the decode row runs the fp32 mat-vec (kernels/linear.py):
        # measured 0.028 apart at most on these models' logits (H200).
        assert torch.equal(mixed.argmax(-1), alone.argmax(-1))
        err = ((mixed - alone).abs() / (1 + alone.abs().amax(-1, keepdim=True))).max().item()
        assert err < 2e-2, f"mixed step vs its parts: {err:.2e} relative to 1 + max|logit|"
    else:
        torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-4)
