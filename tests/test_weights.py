"""Checkpoints: loading what transformers writes, writing what transformers reads, key variants,
sharding, options, and one clear error per kind of broken checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_reference_checkpoint, write_tokenizer_files
from safetensors.torch import load_file, save_file

from distilqa import CheckpointError, DistilBertForQuestionAnswering, WeightsNotFoundError

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=1000, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)


def published_key_names(n_layers: int = 6) -> set[str]:
    """The tensor names in the published checkpoint's model.safetensors."""
    keys = {
        "distilbert.embeddings.word_embeddings.weight",
        "distilbert.embeddings.position_embeddings.weight",
        "distilbert.embeddings.LayerNorm.weight",
        "distilbert.embeddings.LayerNorm.bias",
        "qa_outputs.weight",
        "qa_outputs.bias",
    }
    for layer in range(n_layers):
        prefix = f"distilbert.transformer.layer.{layer}."
        for module in (
            "attention.q_lin",
            "attention.k_lin",
            "attention.v_lin",
            "attention.out_lin",
            "sa_layer_norm",
            "ffn.lin1",
            "ffn.lin2",
            "output_layer_norm",
        ):
            keys |= {f"{prefix}{module}.weight", f"{prefix}{module}.bias"}
    return keys


def sample_ids(vocab_size: int, length: int = 10):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length // 2 :] = 0
    return input_ids, attention_mask


def logits_of(model, vocab_size: int) -> torch.Tensor:
    input_ids, attention_mask = sample_ids(vocab_size)
    with torch.no_grad():
        out = model(input_ids, attention_mask)
    return torch.stack([out.start_logits, out.end_logits])


def load_reference(directory, **kwargs):
    transformers.utils.logging.disable_progress_bar()
    return transformers.DistilBertForQuestionAnswering.from_pretrained(directory, attn_implementation="eager", **kwargs)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_reference_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1, **TINY)


@pytest.fixture(scope="module")
def tiny_state(tiny_checkpoint) -> dict[str, torch.Tensor]:
    return load_file(tiny_checkpoint / "model.safetensors")


@pytest.fixture(scope="module")
def tiny_logits(tiny_checkpoint) -> torch.Tensor:
    """The reference: transformers' own logits on the tiny checkpoint."""
    return logits_of_reference(load_reference(tiny_checkpoint), TINY["vocab_size"])


def logits_of_reference(reference, vocab_size: int) -> torch.Tensor:
    input_ids, attention_mask = sample_ids(vocab_size)
    with torch.no_grad():
        out = reference(input_ids=input_ids, attention_mask=attention_mask)
    return torch.stack([out.start_logits, out.end_logits])


def write_checkpoint(directory: Path, source: Path, state: dict[str, torch.Tensor]) -> Path:
    """A checkpoint folder with ``source``'s config.json and ``state`` as model.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "config.json", directory / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    return directory


def load_tiny(directory) -> DistilBertForQuestionAnswering:
    return DistilBertForQuestionAnswering.from_pretrained(directory, attn_implementation="eager")


# -- round trips -----------------------------------------------------------------------------------


def test_transformers_checkpoint_loads_with_equal_logits(published_checkpoint):
    ours = DistilBertForQuestionAnswering.from_pretrained(published_checkpoint, attn_implementation="eager")
    reference = load_reference(published_checkpoint).eval()
    assert torch.equal(logits_of(ours, 28996), logits_of_reference(reference, 28996))
    stored = load_file(published_checkpoint / "model.safetensors")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, stored[name]), name


def test_our_checkpoint_loads_in_transformers(published_checkpoint, tmp_path):
    ours = DistilBertForQuestionAnswering.from_pretrained(published_checkpoint, attn_implementation="eager")
    ours.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    reference, info = load_reference(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert not info.get("error_msgs")
    assert torch.equal(logits_of(ours, 28996), logits_of_reference(reference.eval(), 28996))
    # The saved tensors are the loaded ones, bit for bit, under the published names.
    saved, original = load_file(tmp_path / "model.safetensors"), load_file(published_checkpoint / "model.safetensors")
    assert set(saved) == set(original) == published_key_names()
    assert all(torch.equal(saved[name], original[name]) for name in saved)


def test_tiny_round_trip_through_both_libraries(tiny_checkpoint, tiny_logits, tmp_path):
    ours = load_tiny(tiny_checkpoint)
    assert torch.equal(logits_of(ours, TINY["vocab_size"]), tiny_logits)
    ours.save_pretrained(tmp_path / "ours")
    again = load_tiny(tmp_path / "ours")
    assert torch.equal(logits_of(again, TINY["vocab_size"]), tiny_logits)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "distilbert"


def test_transformers_written_keys_are_the_published_names(tiny_state, published_checkpoint):
    assert set(tiny_state) == published_key_names(n_layers=2)
    assert set(load_file(published_checkpoint / "model.safetensors")) == published_key_names()


# -- key variants ----------------------------------------------------------------------------------


def test_bare_encoder_keys_without_prefix(tiny_checkpoint, tiny_state, tiny_logits, tmp_path):
    """A DistilBertModel checkpoint (keys without ``distilbert.``) plus a qa_outputs head."""
    state = {name.removeprefix("distilbert."): tensor for name, tensor in tiny_state.items()}
    assert "embeddings.word_embeddings.weight" in state and "qa_outputs.weight" in state
    model = load_tiny(write_checkpoint(tmp_path, tiny_checkpoint, state))
    assert torch.equal(logits_of(model, TINY["vocab_size"]), tiny_logits)


def test_legacy_layernorm_gamma_beta(tiny_checkpoint, tiny_state, tiny_logits, tmp_path):
    state = {}
    for name, tensor in tiny_state.items():
        if "LayerNorm" in name or "layer_norm" in name:
            name = name.removesuffix(".weight") + ".gamma" if name.endswith(".weight") else name
            name = name.removesuffix(".bias") + ".beta" if name.endswith(".bias") else name
        state[name] = tensor
    assert "distilbert.embeddings.LayerNorm.gamma" in state
    assert "distilbert.transformer.layer.1.output_layer_norm.beta" in state
    model = load_tiny(write_checkpoint(tmp_path, tiny_checkpoint, state))
    assert torch.equal(logits_of(model, TINY["vocab_size"]), tiny_logits)


def test_stray_position_ids_buffer_is_ignored(tiny_checkpoint, tiny_state, tiny_logits, tmp_path):
    position_ids = torch.arange(TINY["max_position_embeddings"], dtype=torch.int64)[None, :]
    state = {**tiny_state, "distilbert.embeddings.position_ids": position_ids}
    model = load_tiny(write_checkpoint(tmp_path, tiny_checkpoint, state))
    assert torch.equal(logits_of(model, TINY["vocab_size"]), tiny_logits)


def write_sharded(directory: Path, source: Path, state: dict[str, torch.Tensor], extra_index_keys=()) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "config.json", directory / "config.json")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2]}
    shards["model-00002-of-00002.safetensors"] = names[len(names) // 2 :]
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, directory / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, shard)
    weight_map |= dict.fromkeys(extra_index_keys, "model-00001-of-00002.safetensors")
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    return directory


def test_sharded_checkpoint(tiny_checkpoint, tiny_state, tiny_logits, tmp_path):
    directory = write_sharded(tmp_path, tiny_checkpoint, tiny_state)
    assert not (directory / "model.safetensors").exists()
    model = load_tiny(directory)
    assert torch.equal(logits_of(model, TINY["vocab_size"]), tiny_logits)


# -- options ---------------------------------------------------------------------------------------


def test_dtype_and_device_options(tiny_checkpoint, tiny_logits):
    model = DistilBertForQuestionAnswering.from_pretrained(tiny_checkpoint, dtype=torch.float16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.dtype == torch.float16 and model.device == torch.device("cpu")
    logits = logits_of(model, TINY["vocab_size"])
    assert logits.dtype == torch.float16
    assert (logits.float() - tiny_logits).abs().max().item() <= 1e-2
    bf16 = DistilBertForQuestionAnswering.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_defaults_fp32_cpu_eval_sdpa(tiny_checkpoint):
    model = DistilBertForQuestionAnswering.from_pretrained(tiny_checkpoint)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.device == torch.device("cpu")
    assert not model.training
    assert not any(module.training for module in model.modules())
    assert model.attn_implementation == "sdpa"
    assert all(p.requires_grad for p in model.parameters()), "loaded weights must be trainable"
    assert not any(p.is_meta for p in model.parameters())


def test_loaded_config_matches_checkpoint(tiny_checkpoint):
    model = load_tiny(tiny_checkpoint)
    for name, value in TINY.items():
        assert getattr(model.config, name) == value, name


# -- corrupt checkpoints: each has its own clear error ---------------------------------------------


def assert_not_bare_key_error(error: pytest.ExceptionInfo) -> str:
    assert not isinstance(error.value, KeyError)
    return str(error.value)


def test_missing_key(tiny_checkpoint, tiny_state, tmp_path):
    name = "distilbert.transformer.layer.1.ffn.lin2.bias"
    state = {k: v for k, v in tiny_state.items() if k != name}
    with pytest.raises(CheckpointError, match="missing keys") as error:
        load_tiny(write_checkpoint(tmp_path, tiny_checkpoint, state))
    message = assert_not_bare_key_error(error)
    assert name in message and str(tmp_path) in message


def test_unexpected_key(tiny_checkpoint, tiny_state, tmp_path):
    name = "distilbert.transformer.layer.2.attention.q_lin.weight"
    state = {**tiny_state, name: torch.zeros(32, 32)}
    with pytest.raises(CheckpointError, match="unexpected keys") as error:
        load_tiny(write_checkpoint(tmp_path, tiny_checkpoint, state))
    assert name in assert_not_bare_key_error(error)


def test_missing_and_unexpected_reported_together(tiny_checkpoint, tiny_state, tmp_path):
    state = {k: v for k, v in tiny_state.items() if k != "qa_outputs.bias"}
    state["qa_outputs.offset"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as error:
        load_tiny(write_checkpoint(tmp_path, tiny_checkpoint, state))
    message = assert_not_bare_key_error(error)
    assert "qa_outputs.bias" in message and "qa_outputs.offset" in message


def test_wrong_shape(tiny_checkpoint, tiny_state, tmp_path):
    state = {**tiny_state, "qa_outputs.weight": torch.zeros(3, 32)}
    with pytest.raises(CheckpointError, match="shape") as error:
        load_tiny(write_checkpoint(tmp_path, tiny_checkpoint, state))
    message = assert_not_bare_key_error(error)
    assert "qa_outputs.weight" in message and "(3, 32)" in message and "(2, 32)" in message


def test_non_float_tensor(tiny_checkpoint, tiny_state, tmp_path):
    name = "distilbert.transformer.layer.0.attention.q_lin.weight"
    state = {**tiny_state, name: torch.ones(32, 32, dtype=torch.int32)}
    with pytest.raises(CheckpointError, match="floating") as error:
        load_tiny(write_checkpoint(tmp_path, tiny_checkpoint, state))
    message = assert_not_bare_key_error(error)
    assert name in message and "int32" in message


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        load_tiny(tmp_path)
    assert str(path) in assert_not_bare_key_error(error)


def test_corrupt_header(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "model.safetensors"
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path.write_bytes(noise.numpy().tobytes())
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as error:
        load_tiny(tmp_path)
    assert str(path) in assert_not_bare_key_error(error)


def test_no_config_json(tiny_checkpoint, tmp_path):
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"config\.json") as error:
        load_tiny(tmp_path)
    assert str(tmp_path) in assert_not_bare_key_error(error)


def test_invalid_config_json(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON") as error:
        load_tiny(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)


def test_no_weights_file(tiny_checkpoint, tmp_path):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors") as error:
        load_tiny(tmp_path)
    assert str(tmp_path) in assert_not_bare_key_error(error)


def test_pickle_only_is_refused_without_unpickling(tiny_checkpoint, tmp_path, monkeypatch):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CheckpointError, match="pickle") as error:
        load_tiny(tmp_path)
    message = assert_not_bare_key_error(error)
    assert calls == []
    assert "pytorch_model.bin" in message
    assert "never unpickles" in message
    assert "save_file" in message and "weights_only=True" in message  # how to convert


def test_path_that_is_a_file(tiny_checkpoint):
    path = tiny_checkpoint / "model.safetensors"
    with pytest.raises(CheckpointError, match="is a file") as error:
        load_tiny(path)
    assert str(path) in assert_not_bare_key_error(error)


def test_nonexistent_path(tmp_path):
    path = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(WeightsNotFoundError) as error:
        load_tiny(path)
    assert str(path) in assert_not_bare_key_error(error)


def test_index_lists_tensor_no_shard_holds(tiny_checkpoint, tiny_state, tmp_path):
    ghost = "distilbert.transformer.layer.0.attention.ghost.weight"
    directory = write_sharded(tmp_path, tiny_checkpoint, tiny_state, extra_index_keys=[ghost])
    with pytest.raises(CheckpointError, match="no shard holds") as error:
        load_tiny(directory)
    assert ghost in assert_not_bare_key_error(error)


def test_index_names_missing_shard(tiny_checkpoint, tiny_state, tmp_path):
    directory = write_sharded(tmp_path, tiny_checkpoint, tiny_state)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing") as error:
        load_tiny(directory)
    assert "model-00002-of-00002.safetensors" in assert_not_bare_key_error(error)


@pytest.mark.parametrize("content", ["{broken", json.dumps({"metadata": {}}), json.dumps([1])])
def test_invalid_index(tiny_checkpoint, tiny_state, tmp_path, content):
    directory = write_sharded(tmp_path, tiny_checkpoint, tiny_state)
    (directory / "model.safetensors.index.json").write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a valid safetensors index") as error:
        load_tiny(directory)
    assert "model.safetensors.index.json" in assert_not_bare_key_error(error)


def tokenizer_beside(directory: Path, weights_from: Path, vocab: list[str]) -> Path:
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(weights_from / name, directory / name)
    (directory / "vocab.txt").write_text("".join(token + "\n" for token in vocab), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def fitting_checkpoint(tmp_path_factory) -> Path:
    """A small model whose embedding table matches the vocabulary, with the tokenizer files."""
    directory = save_reference_checkpoint(tmp_path_factory.mktemp("fits"), seed=1, dim=32, n_layers=1, n_heads=2)
    return write_tokenizer_files(directory)


def test_load_checkpoint_checks_the_tokenizer_before_the_weights(fitting_checkpoint, tmp_path, monkeypatch):
    from distilqa.pipeline import QuestionAnswerer
    from distilqa.tokenization import SPECIAL_TOKENS
    from distilqa.weights import load_checkpoint

    loaded = load_checkpoint(DistilBertForQuestionAnswering, fitting_checkpoint)
    assert loaded.directory == fitting_checkpoint
    assert loaded.tokenizer.pad_token_id == loaded.model.config.pad_token_id
    stub = tokenizer_beside(tmp_path / "stub", fitting_checkpoint, list(SPECIAL_TOKENS))
    monkeypatch.setattr(DistilBertForQuestionAnswering, "from_pretrained", None)  # the weights are never read
    for load in (
        lambda: load_checkpoint(DistilBertForQuestionAnswering, stub),
        lambda: QuestionAnswerer.from_pretrained(stub),
    ):
        with pytest.raises(CheckpointError, match=r"stub: the tokenizer does not fit the model: .*\[UNK\]"):
            load()
    shifted = tokenizer_beside(tmp_path / "shifted", fitting_checkpoint, ["[UNK]", "[PAD]", *SPECIAL_TOKENS[2:], "the"])
    with pytest.raises(CheckpointError, match="the tokenizer's \\[PAD\\] is id 1 but the model's pad_token_id is 0"):
        load_checkpoint(DistilBertForQuestionAnswering, shifted)


def test_load_checkpoint_refuses_ids_beyond_the_embedding_table(fitting_checkpoint, tmp_path):
    from distilqa.weights import load_checkpoint

    small = save_reference_checkpoint(tmp_path / "small", seed=1, **TINY)  # an embedding table of 1000 rows
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(fitting_checkpoint / name, small / name)
    with pytest.raises(CheckpointError, match="embedding table has 1000 rows"):
        load_checkpoint(DistilBertForQuestionAnswering, small)


def test_load_checkpoint_refuses_a_device_before_reading(tiny_checkpoint):
    from distilqa.weights import load_checkpoint

    with pytest.raises(ValueError, match="unknown device 'nonsense'"):
        load_checkpoint(DistilBertForQuestionAnswering, tiny_checkpoint, device="nonsense")
