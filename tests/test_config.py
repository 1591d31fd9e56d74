"""DistilBertConfig: published defaults, reading transformers' config.json, validation, round trips."""

from __future__ import annotations

import json

import pytest
from conftest import PUBLISHED_CONFIG

from distilqa import DistilBertConfig

# The config.json of distilbert/distilbert-base-cased-distilled-squad as published on the hub,
# written by an old transformers release: it has keys this model does not use.
PUBLISHED_CONFIG_JSON = {
    "activation": "gelu",
    "architectures": ["DistilBertForQuestionAnswering"],
    "attention_dropout": 0.1,
    "dim": 768,
    "dropout": 0.1,
    "hidden_dim": 3072,
    "initializer_range": 0.02,
    "max_position_embeddings": 512,
    "model_type": "distilbert",
    "n_heads": 12,
    "n_layers": 6,
    "output_past": True,
    "pad_token_id": 0,
    "qa_dropout": 0.1,
    "seq_classif_dropout": 0.2,
    "sinusoidal_pos_embds": True,
    "tie_weights_": True,
    "vocab_size": 28996,
}


def test_defaults_are_the_published_configuration():
    config = DistilBertConfig()
    for name, value in PUBLISHED_CONFIG.items():
        assert getattr(config, name) == value, name
    assert (config.vocab_size, config.dim, config.n_layers, config.n_heads) == (28996, 768, 6, 12)
    assert (config.hidden_dim, config.max_position_embeddings) == (3072, 512)
    assert config.sinusoidal_pos_embds is True
    assert config.activation == "gelu"
    assert config.head_dim == 64
    assert (config.dropout, config.attention_dropout, config.qa_dropout) == (0.1, 0.1, 0.1)
    assert config.pad_token_id == 0


def test_published_config_json_ignores_unknown_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PUBLISHED_CONFIG_JSON), encoding="utf-8")
    assert DistilBertConfig.from_json_file(path) == DistilBertConfig()


def test_config_json_written_by_installed_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.DistilBertConfig(**PUBLISHED_CONFIG).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert set(written) - set(DistilBertConfig().to_dict()), "expected keys we do not use"
    assert DistilBertConfig.from_json_file(tmp_path / "config.json") == DistilBertConfig()


def test_from_dict_reads_non_default_values():
    config = DistilBertConfig.from_dict(
        {"dim": 64, "n_heads": 4, "hidden_dim": 128, "activation": "relu", "sinusoidal_pos_embds": False, "x": 1}
    )
    assert (config.dim, config.n_heads, config.hidden_dim, config.activation) == (64, 4, 128, "relu")
    assert config.sinusoidal_pos_embds is False
    assert config.head_dim == 16


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dim": 100, "n_heads": 12}, "n_heads"),
        ({"activation": "swish"}, "activation"),
        ({"activation": "GELU"}, "activation"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"dim": -768}, "dim"),
        ({"n_layers": 0}, "n_layers"),
        ({"n_heads": 0}, "n_heads"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"max_position_embeddings": -1}, "max_position_embeddings"),
        ({"n_layers": True}, "n_layers"),
        ({"vocab_size": "28996"}, "vocab_size"),
        ({"dim": 768.0}, "dim"),
        ({"hidden_dim": None}, "hidden_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"attention_dropout": "0.1"}, "attention_dropout"),
        ({"qa_dropout": 1.5}, "qa_dropout"),
        ({"pad_token_id": 28996}, "pad_token_id"),
        ({"pad_token_id": -1}, "pad_token_id"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        DistilBertConfig(**overrides)


def test_indivisible_dim_names_both_numbers():
    with pytest.raises(ValueError, match=r"dim \(100\).*n_heads \(12\)"):
        DistilBertConfig(dim=100)


def test_unknown_activation_lists_the_choices():
    with pytest.raises(ValueError, match="gelu, relu"):
        DistilBertConfig(activation="tanh")


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"dim": 768,', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON") as error:
        DistilBertConfig.from_json_file(path)
    assert str(path) in str(error.value)


def test_json_that_is_not_an_object_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON object") as error:
        DistilBertConfig.from_json_file(path)
    assert str(path) in str(error.value)


def test_invalid_value_in_file_names_file_and_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PUBLISHED_CONFIG_JSON, "n_heads": 7}), encoding="utf-8")
    with pytest.raises(ValueError, match="n_heads") as error:
        DistilBertConfig.from_json_file(path)
    assert str(path) in str(error.value)


def test_to_dict_round_trip(tmp_path):
    config = DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128, activation="relu")
    as_dict = config.to_dict()
    assert as_dict["model_type"] == "distilbert"
    assert as_dict["architectures"] == ["DistilBertForQuestionAnswering"]
    assert DistilBertConfig.from_dict(as_dict) == config
    config.to_json_file(tmp_path / "config.json")
    assert DistilBertConfig.from_json_file(tmp_path / "config.json") == config


def test_config_json_is_read_by_transformers(tmp_path):
    """The file we write is read back by transformers' own reader with every value intact."""
    transformers = pytest.importorskip("transformers")
    ours = DistilBertConfig(
        vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128, activation="relu", sinusoidal_pos_embds=False
    )
    ours.to_json_file(tmp_path / "config.json")
    theirs = transformers.DistilBertConfig.from_json_file(tmp_path / "config.json")
    expected = dict(
        vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=512, activation="relu"
    )
    for name, value in expected.items():
        assert getattr(theirs, name) == value, name
    assert theirs.sinusoidal_pos_embds is False
    assert theirs.pad_token_id == 0
    assert theirs.model_type == "distilbert"
    assert theirs.architectures == ["DistilBertForQuestionAnswering"]
