"""ModelConfig.from_gguf on real files and on metadata that is wrong."""

from __future__ import annotations

import dataclasses

import pytest

from kiln.config import ModelConfig
from kiln.errors import ConfigError, UnsupportedError
from kiln.gguf import read_gguf


def test_stories260k(stories_model):
    c = read_gguf(stories_model).config
    assert (c.arch, c.n_layer, c.n_embd, c.n_head, c.n_head_kv) == ("llama", 5, 64, 8, 4)
    assert (c.head_dim, c.n_ff, c.n_vocab, c.n_ctx_train) == (8, 172, 512, 2048)
    assert c.rope_base == 10000.0 and c.rope_dim == 8 and not c.tied_output
    assert c.rms_eps == pytest.approx(1e-5)


def test_demo_model(demo_model):
    c = read_gguf(demo_model).config
    assert (c.arch, c.n_layer, c.n_embd, c.n_head, c.n_head_kv) == ("llama", 30, 576, 9, 3)
    assert (c.head_dim, c.n_ff, c.n_vocab, c.n_ctx_train) == (64, 1536, 49152, 8192)
    assert c.rope_base == 100000.0 and c.tied_output
    assert c.rope_scaling.kind == "none"


def test_config_is_frozen(stories_model):
    c = read_gguf(stories_model).config
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_layer = 3  # type: ignore[misc]


def _copy(model, **metadata):
    meta = dict(model.metadata)
    for k, v in metadata.items():
        key = k.replace("__", ".")
        if v is None:
            meta.pop(key, None)
        else:
            meta[key] = v
    return dataclasses.replace(model, metadata=meta, _config=None)


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"general__architecture": "mamba"}, UnsupportedError, "architecture 'mamba'"),
        ({"general__architecture": None}, ConfigError, "general.architecture"),
        ({"llama__block_count": None}, ConfigError, "llama.block_count"),
        ({"llama__embedding_length": 72}, ConfigError, "token_embd.weight"),
        ({"llama__embedding_length": 65}, ConfigError, "not divisible by head_count"),
        ({"llama__attention__head_count_kv": 3}, ConfigError, "head_count_kv"),
        ({"llama__block_count": 6}, ConfigError, "blk.5.attn_norm.weight"),
        ({"llama__context_length": "long"}, ConfigError, "must be an integer"),
        ({"llama__attention__layer_norm_rms_epsilon": None}, ConfigError, "rms_epsilon"),
        ({"llama__rope__scaling__type": "longrope"}, UnsupportedError, "longrope"),
    ],
)
def test_bad_metadata(stories_model, change, error, words):
    model = _copy(read_gguf(stories_model), **change)
    with pytest.raises(error) as info:
        ModelConfig.from_gguf(model)
    assert words in str(info.value)
    assert str(stories_model) in str(info.value)


def test_llama_with_experts(stories_model):
    """llama.cpp's llama carries Mixtral-style experts when expert_count > 0: the config reads
    them (feed_forward_length is one expert's size there); a wrong count is a clear error."""
    from kiln.gguf.moe_split import experts_from_dense

    dense = read_gguf(stories_model)
    assert not dense.config.moe and dense.config.n_expert == 0
    split = experts_from_dense(dense, 4)
    c = split.config
    assert c.moe and (c.n_expert, c.n_expert_used, c.n_ff_expert) == (4, 4, 43)
    bad = dataclasses.replace(
        split, metadata={**split.metadata, "llama.expert_used_count": 5}, _config=None
    )
    with pytest.raises(ConfigError, match="expert_used_count"):
        _ = bad.config
    with pytest.raises(UnsupportedError, match="power of two"):
        experts_from_dense(dense, 3)
