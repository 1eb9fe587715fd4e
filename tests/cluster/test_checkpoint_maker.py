from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.cluster import CacheConfig, EngineConfig, LLMEngine, ModelConfig, SamplingParams
from pdserve.cluster.checkpoint_maker import make_model
from pdserve.cluster.tokenizer import Tokenizer
from pdserve.cluster.tokenizer_trainer import ASSISTANT, BOS, EOS, USER


def test_tiny_checkpoint_files_and_config(tiny_model):
    files = {p.name for p in Path(tiny_model).iterdir()}
    assert {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
    } <= files
    cfg = ModelConfig.from_dir(tiny_model)
    tok = Tokenizer(tiny_model)
    assert cfg.vocab_size == tok.vocab_size
    assert cfg.eos_token_ids == (tok.eos_token_id,)


def test_tokenizer_adds_bos_and_round_trips(tiny_model):
    tok = Tokenizer(tiny_model)
    text = "The expert router sends 1234 tokens: ünïcödé 🙂"
    ids = tok.encode(text)
    assert ids[0] == tok.hf.convert_tokens_to_ids(BOS) == 0
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False).startswith(BOS)


def test_chat_template_marks_roles_with_special_tokens(tiny_model):
    tok = Tokenizer(tiny_model)
    ids = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Again"},
        ]
    )
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == f"{BOS}Be brief.{USER}Hi{ASSISTANT}Hello{EOS}{USER}Again{ASSISTANT}"
    assert ids.count(0) == 1  # one BOS: the template's, not a second one from encoding


def test_mxfp4_checkpoint_loads_and_generates(tmp_path):
    path = make_model(tmp_path / "q", "tiny", mxfp4=True, seed=4)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    engine = LLMEngine(EngineConfig(model=str(path), cache=CacheConfig(block_size=16)))
    out = engine.generate(["hello"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[
        0
    ]
    assert len(out.token_ids) == 6


def test_bad_maker_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        make_model(tmp_path / "x", "huge")
    with pytest.raises(ValueError, match="dtype"):
        make_model(tmp_path / "y", "tiny", dtype="int8")


@pytest.mark.parametrize("preset", ["tiny", "gpt-oss-tiny"])
def test_weights_drawn_at_load_are_the_checkpoints_of_their_seed(tmp_path, preset):
    """``make-model --config-only`` and ``random_weights_seed``: on CPU the same tensors, so the
    same tokens, as the MXFP4 checkpoint of that seed; no safetensors read or written."""
    import torch
    from safetensors.torch import load_file

    from pdserve.cluster.checkpoint_maker import random_tensors

    full = make_model(tmp_path / "full", preset, mxfp4=True, seed=7)
    bare = make_model(tmp_path / "bare", preset, seed=7, weights=False)
    assert not list(bare.glob("*.safetensors"))
    assert json.loads((bare / "config.json").read_text()) == json.loads(
        (full / "config.json").read_text()
    )
    stored = {}
    for f in full.glob("*.safetensors"):
        stored.update(load_file(str(f)))
    cfg = json.loads((bare / "config.json").read_text())
    drawn = dict(random_tensors(cfg, 7, torch.device("cpu")))
    assert drawn.keys() == stored.keys()
    assert all(torch.equal(drawn[k], stored[k]) for k in stored)

    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    cache = CacheConfig(block_size=16)
    want = LLMEngine(EngineConfig(model=str(full), cache=cache)).generate(["a prompt"], sp)
    engine = LLMEngine(EngineConfig(model=str(bare), cache=cache, random_weights_seed=7))
    assert engine.generate(["a prompt"], sp)[0].token_ids == want[0].token_ids
    other = LLMEngine(EngineConfig(model=str(bare), cache=cache, random_weights_seed=8))
    logits = [e.runner.model.lm_head.weight for e in (engine, other)]
    assert not torch.equal(*logits)  # another seed, other weights


def test_weights_drawn_at_load_for_an_fp8_config_keep_fp8_projections(tmp_path):
    import torch

    bare = make_model(tmp_path / "fp8", "tiny", fp8=True, weights=False, dtype="float32")
    assert (
        json.loads((bare / "config.json").read_text())["quantization_config"]["quant_method"]
        == "fp8"
    )
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engines = [
        LLMEngine(EngineConfig(model=str(bare), cache=CacheConfig(block_size=16),
                               random_weights_seed=2))
        for _ in range(2)
    ]  # fmt: skip
    attn = engines[0].runner.model.model.layers[0].self_attn
    assert attn.q_b_proj.takes_fp8 and attn.o_proj.takes_fp8
    assert attn.o_proj.prepared.dtype == torch.float32  # CPU: dequantized once at load
    assert attn.fp8_names() == ()  # q_a's 64 rows are not whole blocks: stacked dequantized
    a, b = (e.generate(["fp8 draw"], sp)[0].token_ids for e in engines)
    assert a == b and len(a) == 8


def test_shards_written_beside_the_draw_are_all_there_and_a_failed_write_is_raised(
    tmp_path, monkeypatch
):
    """Small shards, so several are written on the writer thread while the next is drawn: each
    tensor is in the shard the index names; a write that fails stops the maker with its error."""
    from safetensors import safe_open

    from pdserve.cluster import checkpoint_maker

    monkeypatch.setattr(checkpoint_maker, "SHARD_BYTES", 1 << 14)
    out = checkpoint_maker.make_model(tmp_path / "small", "tiny", seed=0)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_maker, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_maker.make_model(tmp_path / "full", "tiny", seed=0)
