"""Finding a checkpoint by name: the Hugging Face cache first, then weights/, then a download into
the cache; offline, one error that lists every place looked in. No test touches the network: the
hub is offline (HF_HUB_OFFLINE) and "downloads" are a stand-in that writes what the hub would."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distilqa.hub
from distilqa.cli import main
from distilqa.hub import WeightsNotFoundError, find_local_checkpoint, hub_cache_dir, resolve_checkpoint

REPO_ID = "someone/tiny-qa"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = {
    "config.json": b"{}",
    "model.safetensors": b"weights",
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "vocab.txt": b"[PAD]\n",
}


def fake_snapshot(
    cache: Path, repo_id: str = REPO_ID, files: dict[str, bytes] | Path = FILES, commit: str = COMMIT, ref="main"
) -> Path:
    """A snapshot laid out as huggingface_hub writes one: refs/<ref> holds the commit, snapshots/<commit>/
    holds links to the files in blobs/. ``files``: name -> content, or a folder to take them from."""
    if isinstance(files, Path):
        files = {path.name: path.read_bytes() for path in files.iterdir() if path.is_file()}
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def places(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty places, the hub offline: huggingface_hub's cache, $DISTILQA_HOME unset, a weights/ folder."""
    import huggingface_hub.constants

    hf_cache, weights = tmp_path / "hf-cache", tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DISTILQA_HOME", raising=False)
    monkeypatch.setenv("DISTILQA_WEIGHTS_DIR", str(weights))
    # huggingface_hub reads its variables once, at import: set its constants too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return {"hf_cache": hf_cache, "weights": weights, "home": tmp_path / "distilqa-home", "tmp": tmp_path}


@pytest.fixture
def fake_hub(monkeypatch) -> list[dict]:
    """snapshot_download online writes FILES into the cache it is given, as the hub would; lookups
    (local_files_only) run the real function. Returns the online calls' arguments."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    calls = []

    def snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo_id, local_files_only=True, **kwargs)
        calls.append({"repo_id": repo_id, **kwargs})
        return str(fake_snapshot(Path(kwargs["cache_dir"]), repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hugging_face_cache_comes_first(places, fake_hub):
    in_cache = fake_snapshot(places["hf_cache"])
    fake_snapshot(places["weights"] / "someone", files=FILES, commit="tiny-qa", ref=None)  # weights/someone/tiny-qa
    assert resolve_checkpoint(REPO_ID) == in_cache
    assert fake_hub == [], "nothing is downloaded when the cache has every file"


def test_weights_folder_when_cache_lacks_it(places, fake_hub):
    local = places["weights"] / REPO_ID
    local.mkdir(parents=True)
    for name, content in FILES.items():
        (local / name).write_bytes(content)
    assert resolve_checkpoint(REPO_ID) == local
    assert fake_hub == []


def test_incomplete_cached_snapshot_is_not_used(places, fake_hub):
    """transformers users who loaded only the model have no tokenizer files in the cache."""
    fake_snapshot(places["hf_cache"], files={k: v for k, v in FILES.items() if not k.startswith(("tok", "vocab"))})
    found, looked = find_local_checkpoint(REPO_ID)
    assert found is None
    assert any("lacks tokenizer.json or vocab.txt" in line for line in looked), looked


@pytest.mark.parametrize("where", ["argument", "DISTILQA_HOME", "default"])
def test_download_goes_into_the_cache(places, fake_hub, monkeypatch, where):
    expected = {"argument": places["tmp"] / "explicit", "DISTILQA_HOME": places["home"], "default": places["hf_cache"]}
    if where == "DISTILQA_HOME":
        monkeypatch.setenv("DISTILQA_HOME", str(places["home"]))
    cache_dir = expected["argument"] if where == "argument" else None
    folder = resolve_checkpoint(REPO_ID, cache_dir=cache_dir)
    assert [call["cache_dir"] for call in fake_hub] == [expected[where]]
    assert folder.is_relative_to(expected[where]) and (folder / "model.safetensors").read_bytes() == b"weights"
    assert resolve_checkpoint(REPO_ID, cache_dir=cache_dir) == folder, "found there the second time"
    assert len(fake_hub) == 1


def test_revision_resolves_through_the_cache(places, fake_hub):
    main_snapshot = fake_snapshot(places["hf_cache"])
    older = fake_snapshot(places["hf_cache"], commit="f" * 40, ref="v1.0")
    assert resolve_checkpoint(REPO_ID) == main_snapshot
    assert resolve_checkpoint(REPO_ID, revision="v1.0") == older
    assert resolve_checkpoint(REPO_ID, revision="f" * 40) == older
    assert fake_hub == []


def test_offline_error_lists_every_place(places, monkeypatch):
    monkeypatch.setenv("DISTILQA_HOME", str(places["home"]))
    with pytest.raises(WeightsNotFoundError) as error:
        resolve_checkpoint(REPO_ID)
    message = str(error.value)
    for place in (places["home"], places["hf_cache"], places["weights"] / REPO_ID):
        assert str(place) in message, message
    assert "could not download" in message and f"distilqa download {REPO_ID}" in message
    assert "LocalEntryNotFoundError" in message  # the hub's own reason
    assert not places["home"].exists() and not places["hf_cache"].exists(), "looking creates nothing"


@pytest.mark.parametrize(
    "failure", [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.ENOSPC, "No space left on device")]
)
def test_local_failures_are_not_reported_as_download_failures(places, monkeypatch, failure):
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo_id, local_files_only=True, **kwargs)
        raise failure

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(type(failure)) as error:
        resolve_checkpoint(REPO_ID)
    assert not isinstance(error.value, WeightsNotFoundError)
    assert error.value.errno == failure.errno


def test_download_command_says_where_files_went(places, fake_hub, capsys):
    target = places["tmp"] / "my-cache"
    assert main(["download", REPO_ID, "--cache-dir", str(target)]) == 0
    out = capsys.readouterr().out
    folder = Path(fake_hub[0]["cache_dir"]) / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    assert f"files in {folder}" in out and f"DISTILQA_HOME={target}" in out, out


def test_download_command_offline_lists_places(places, capsys):
    assert main(["download", REPO_ID]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distilqa: error: could not download") and "Traceback" not in err
    assert str(places["hf_cache"].resolve()) in err and str(places["weights"] / REPO_ID) in err


def test_ask_answers_from_the_cache_offline(places, tiny_checkpoint, capsys):
    """The whole way: a name, found in the Hugging Face cache with the hub offline, answers a question."""
    from distilqa.pipeline import QuestionAnswerer

    snapshot = fake_snapshot(places["hf_cache"], files=tiny_checkpoint)
    question, context = "Where was HuggingFace founded ?", "HuggingFace was founded in Paris."
    assert main(["ask", "--model", REPO_ID, "--question", question, "--context", context, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer == QuestionAnswerer.from_pretrained(tiny_checkpoint)(question, context)
    assert resolve_checkpoint(REPO_ID) == snapshot


def test_cli_and_hub_import_without_torch():
    """`distilqa --help` must start fast and quietly: the CLI module and the lookup load no torch."""
    code = (
        "import sys, distilqa.cli, distilqa.hub; print(sorted(m for m in ('torch', 'tokenizers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    assert result.stderr == ""


def test_hub_cache_dir_order(places, monkeypatch):
    assert hub_cache_dir() == places["hf_cache"]
    monkeypatch.setenv("DISTILQA_HOME", "~/somewhere")
    assert hub_cache_dir() == Path("~/somewhere").expanduser()
    assert hub_cache_dir(places["tmp"]) == places["tmp"]
    assert distilqa.hub.weights_dir() == places["weights"]


def test_check_model_name_refuses_without_looking_anything_up(tmp_path, monkeypatch):
    monkeypatch.setattr(distilqa.hub, "find_local_checkpoint", None)  # nothing is looked up
    distilqa.hub.check_model_name(tmp_path)  # a folder
    distilqa.hub.check_model_name("distilbert/distilbert-base-cased-distilled-squad")  # a repo id, maybe remote
    with pytest.raises(distilqa.hub.WeightsNotFoundError, match="no checkpoint folder at"):
        distilqa.hub.check_model_name(tmp_path / "missing" / "deeper")
    (tmp_path / "file.txt").write_text("x", encoding="utf-8")
    with pytest.raises(distilqa.hub.CheckpointError, match="is a file"):
        distilqa.hub.check_model_name(tmp_path / "file.txt")
