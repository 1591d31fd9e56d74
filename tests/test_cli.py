"""Tests for the ``distilqa`` command (distilqa/cli.py).

Commands run in-process through ``distilqa.cli.main`` (fast); one test runs the real command in a
subprocess to check exit status and that no traceback reaches the user. ``ask`` and ``evaluate`` use
a tiny random checkpoint; ``verify`` uses the published-size one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SQUAD_FILE

from distilqa.cli import main
from distilqa.pipeline import QuestionAnswerer
from distilqa.weights import WeightsNotFoundError

CONTEXT = "Alice is sitting on the bench. Bob is sitting next to her in Paris."
QUESTION = "Who is sitting next to Alice?"

SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Super_Bowl_50",
            "paragraphs": [
                {
                    "context": "The Denver Broncos defeated the Carolina Panthers 24–10 in Super Bowl 50, "
                    "played at Levi's Stadium in Santa Clara.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Who won?",
                            "answers": [{"text": "Denver Broncos", "answer_start": 4}],
                        },
                        {
                            "id": "q2",
                            "question": "Which team won Super Bowl 50?",
                            "answers": [{"text": "Denver Broncos", "answer_start": 4}],
                        },
                        {
                            "id": "q3",
                            "question": "Who lost?",
                            "answers": [{"text": "Carolina Panthers", "answer_start": 32}],
                        },
                    ],
                }
            ],
        },
        {
            "title": "Paris",
            "paragraphs": [
                {
                    "context": "HuggingFace was founded in Paris.",
                    "qas": [
                        {
                            "id": "q4",
                            "question": "Where was HuggingFace founded?",
                            "answers": [{"text": "Paris", "answer_start": 27}],
                        },
                        {
                            "id": "q5",
                            "question": "What was founded?",
                            "answers": [{"text": "HuggingFace", "answer_start": 0}],
                        },
                        {"id": "q6", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 27}]},
                    ],
                }
            ],
        },
    ],
}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> QuestionAnswerer:
    return QuestionAnswerer.from_pretrained(tiny_checkpoint)


@pytest.fixture
def squad_file(tmp_path) -> Path:
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(SQUAD), encoding="utf-8")
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """No weights and no network: an empty weights folder, an empty hub cache, and the hub offline."""
    weights = tmp_path / "empty-weights"
    weights.mkdir()
    monkeypatch.setenv("DISTILQA_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads those variables once, at import: set its constants too, so that a machine
    # with network access (CI) does not download the real checkpoint here.
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    return weights


EVALUATE_KEYS = {"exact_match", "f1", "questions", "answered", "missing", "seconds", "questions_per_second"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def check_user_error(status: int, err: str, *phrases: str) -> None:
    """Exit status 2 and one ``distilqa: error: ...`` message, no traceback; only a progress bar may
    come before it."""
    assert status == 2, err
    assert "Traceback" not in err
    assert err.count("distilqa: error: ") == 1, err
    before, message = err.split("distilqa: error: ")
    assert all("%|" in line for line in before.splitlines() if line.strip()), err
    for phrase in phrases:
        assert phrase in message, err


# --------------------------------------------------------------------------- #
# ask
# --------------------------------------------------------------------------- #


def test_ask_prints_the_answer(capsys, tiny_checkpoint, tiny):
    expected = tiny(QUESTION, CONTEXT)
    status, out, _ = run(capsys, "ask", "--model", tiny_checkpoint, "--question", QUESTION, "--context", CONTEXT)
    assert status == 0
    assert (
        out
        == f"{expected['answer']}\t(score {expected['score']:.4f}, characters {expected['start']}-{expected['end']})\n"
    )


def test_ask_json(capsys, tiny_checkpoint, tiny):
    status, out, _ = run(
        capsys, "ask", "--model", tiny_checkpoint, "--question", QUESTION, "--context", CONTEXT, "--json"
    )
    assert status == 0
    answer = json.loads(out)
    assert set(answer) == {"score", "start", "end", "answer"}
    assert answer["answer"] == CONTEXT[answer["start"] : answer["end"]]
    expected = tiny(QUESTION, CONTEXT)
    assert (answer["answer"], answer["start"], answer["end"]) == (
        expected["answer"],
        expected["start"],
        expected["end"],
    )
    assert answer["score"] == pytest.approx(expected["score"], abs=1e-6)


def test_ask_top_k_json_gives_a_list(capsys, tiny_checkpoint):
    status, out, _ = run(
        capsys,
        "ask",
        "--model",
        tiny_checkpoint,
        "--question",
        QUESTION,
        "--context",
        CONTEXT,
        "--top-k",
        "3",
        "--json",
    )
    assert status == 0
    answers = json.loads(out)
    assert isinstance(answers, list) and 1 <= len(answers) <= 3
    assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)
    for answer in answers:
        assert answer["answer"] == CONTEXT[answer["start"] : answer["end"]]


def test_ask_top_k_plain_prints_one_line_per_answer(capsys, tiny_checkpoint):
    status, out, _ = run(
        capsys, "ask", "--model", tiny_checkpoint, "--question", QUESTION, "--context", CONTEXT, "--top-k", "3"
    )
    assert status == 0
    assert len(out.splitlines()) == 3 and all("\t(score " in line for line in out.splitlines())


def test_ask_context_file(capsys, tmp_path, tiny_checkpoint, tiny):
    context = "Ünïcode cöntext\r\nwith 北京 and 🍕.\nBob is in Paris.\n"
    path = tmp_path / "context.txt"
    path.write_bytes(context.encode("utf-8"))
    status, out, _ = run(
        capsys, "ask", "--model", tiny_checkpoint, "--question", "Where is Bob?", "--context-file", path, "--json"
    )
    assert status == 0
    answer = json.loads(out)
    expected = tiny("Where is Bob?", context)
    assert (answer["answer"], answer["start"], answer["end"]) == (
        expected["answer"],
        expected["start"],
        expected["end"],
    )
    assert answer["answer"] == context[answer["start"] : answer["end"]]


def test_ask_context_file_errors(capsys, tmp_path, tiny_checkpoint):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café crème".encode("latin-1"))
    status, _, err = run(capsys, "ask", "--model", tiny_checkpoint, "--question", "q?", "--context-file", latin1)
    check_user_error(status, err, str(latin1), "UTF-8")
    missing = tmp_path / "missing.txt"
    status, _, err = run(capsys, "ask", "--model", tiny_checkpoint, "--question", "q?", "--context-file", missing)
    check_user_error(status, err, "missing.txt")
    status, _, err = run(capsys, "ask", "--model", tiny_checkpoint, "--question", "q?", "--context-file", tmp_path)
    check_user_error(status, err, "is a folder")


@pytest.mark.parametrize(
    ("arguments", "phrase"),
    [
        (["--question", "Who?"], "--context"),
        (["--context", "Bob."], "--question"),
        (["--question", "", "--context", "Bob."], "question 0 is empty"),
        (["--question", "Who?", "--context", "\u200b"], "context 0 has no tokens"),
        (["--question", "Who?", "--context", "Bob.", "--top-k", "0"], "--top-k"),
        (["--question", "Who?", "--context", "Bob.", "--max-answer-len", "0"], "--max-answer-len"),
    ],
)
def test_ask_bad_arguments_exit_2(capsys, tiny_checkpoint, arguments, phrase):
    status, out, err = run(capsys, "ask", "--model", tiny_checkpoint, *arguments)
    check_user_error(status, err, phrase)
    assert out == ""


def test_ask_missing_model_folder_exits_2(capsys, tmp_path):
    status, _, err = run(capsys, "ask", "--model", tmp_path / "nowhere", "--question", "Who?", "--context", "Bob.")
    check_user_error(status, err, "nowhere")


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


PAIRS = [
    {"id": "first", "question": "Who is sitting?", "context": CONTEXT},
    {"question": "Where was HuggingFace founded ?", "context": "HuggingFace was founded in Paris."},
    "",  # blank lines are skipped
    {"id": 3, "question": "北京是什么？", "context": "北京是中国的首都。\r\nBeijing 🏙️."},
]


def test_ask_jsonl_input_and_output(capsys, tmp_path, tiny_checkpoint, tiny):
    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    target = tmp_path / "answers.jsonl"
    status, out, _ = run(capsys, "ask", "--model", tiny_checkpoint, "--input", source, "--output", target)
    assert status == 0
    assert out == ""
    records = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    pairs = [pair for pair in PAIRS if pair]
    assert len(records) == len(pairs)
    for record, pair in zip(records, pairs):
        assert record.get("id") == pair.get("id")  # ids kept, of any JSON type; none added
        assert ("id" in record) == ("id" in pair)
        assert record["question"] == pair["question"]
        answer = record["answer"]
        assert answer["answer"] == pair["context"][answer["start"] : answer["end"]]
        expected = tiny(pair["question"], pair["context"])
        assert (answer["answer"], answer["start"], answer["end"]) == (
            expected["answer"],
            expected["start"],
            expected["end"],
        )


def test_ask_jsonl_keeps_unicode_line_separators_and_crlf(capsys, tmp_path, tiny_checkpoint):
    """JSON Lines are split on "\\n" only: U+2028, U+0085 and \\x1c are text inside JSON strings, and a
    "\\r\\n" line ending is JSON whitespace."""
    context = "Bob\u2028is sitting\x85 in\x1c Paris.\r\nAlice too."
    lines = [json.dumps({"id": i, "question": "Who?", "context": context}, ensure_ascii=False) for i in range(2)]
    source = tmp_path / "pairs.jsonl"
    source.write_bytes("\r\n".join(lines).encode("utf-8") + b"\r\n")
    status, out, err = run(capsys, "ask", "--model", tiny_checkpoint, "--input", source)
    assert status == 0, err
    records = [json.loads(line) for line in out.split("\n") if line]  # not splitlines: U+2028 is in the JSON
    assert [r["id"] for r in records] == [0, 1]
    for record in records:
        assert record["answer"]["answer"] == context[record["answer"]["start"] : record["answer"]["end"]]


def test_ask_jsonl_output_to_a_directory_exits_2(capsys, tmp_path, tiny_checkpoint):
    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    status, _, err = run(capsys, "ask", "--model", tiny_checkpoint, "--input", source, "--output", tmp_path)
    check_user_error(status, err, f"--output {tmp_path} already exists")
    argv = ["ask", "--model", tiny_checkpoint, "--input", source, "--output", tmp_path, "--overwrite"]
    status, _, err = run(capsys, *argv)
    check_user_error(status, err, f"--output {tmp_path} is a folder; name a file")


def test_ask_jsonl_to_stdout_with_top_k(capsys, tmp_path, tiny_checkpoint):
    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    status, out, _ = run(capsys, "ask", "--model", tiny_checkpoint, "--input", source, "--top-k", "2")
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r.get("id") for r in records] == ["first", None, 3]
    assert all(isinstance(r["answer"], list) and 1 <= len(r["answer"]) <= 2 for r in records)


@pytest.mark.parametrize(
    ("bad_line", "phrase"),
    [
        ('{"question": "Who?", "context": ', "not valid JSON"),
        ({"question": "Who?"}, '"context"'),
        ({"context": "Bob."}, '"question"'),
        ({"question": "", "context": "Bob."}, "empty"),
        ({"question": "Who?", "context": "  \t "}, "empty"),
        ({"question": "Who?", "context": 42}, '"context"'),
        (["Who?", "Bob."], "expected an object"),
    ],
    ids=["invalid-json", "missing-context", "missing-question", "empty-question", "blank-context", "int", "list"],
)
def test_ask_jsonl_bad_line_exits_2_naming_file_and_line(capsys, tmp_path, tiny_checkpoint, bad_line, phrase):
    source = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], PAIRS[1], "", bad_line, PAIRS[3]])
    target = tmp_path / "answers.jsonl"
    target.write_text("previous answers\n", encoding="utf-8")
    argv = ["ask", "--model", tiny_checkpoint, "--input", source, "--output", target, "--overwrite"]
    status, out, err = run(capsys, *argv)
    check_user_error(status, err, f"{source}:4", phrase)
    assert out == ""
    assert target.read_text(encoding="utf-8") == "previous answers\n", "nothing is written before validation"


def test_ask_jsonl_without_questions_exits_2(capsys, tmp_path, tiny_checkpoint):
    source = write_jsonl(tmp_path / "pairs.jsonl", ["", "  "])
    status, _, err = run(capsys, "ask", "--model", tiny_checkpoint, "--input", source)
    check_user_error(status, err, "no question")


def test_ask_jsonl_with_question_flag_exits_2(capsys, tmp_path, tiny_checkpoint):
    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    status, _, err = run(capsys, "ask", "--model", tiny_checkpoint, "--input", source, "--question", "Who?")
    check_user_error(status, err, "--question")


def test_ask_jsonl_context_without_tokens_names_line_and_keeps_output(capsys, tmp_path, tiny_checkpoint):
    source = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], {"question": "Who?", "context": "\u200b\u200c"}])
    target = tmp_path / "answers.jsonl"
    target.write_text("previous answers\n", encoding="utf-8")
    argv = ["ask", "--model", tiny_checkpoint, "--input", source, "--output", target, "--overwrite"]
    status, _, err = run(capsys, *argv)
    check_user_error(status, err, f"{source}:2: the context has no tokens")
    assert target.read_text(encoding="utf-8") == "previous answers\n"


def test_ask_jsonl_names_the_failing_line_beyond_the_first_chunk(capsys, tmp_path, tiny_checkpoint, monkeypatch):
    """The pipeline's PairError gives the failing pair's index; the CLI maps it to the file's line,
    across chunks and blank lines (line 7 is the 5th pair, in the 3rd chunk of 2)."""
    import distilqa.cli as cli

    monkeypatch.setattr(cli, "LINES_PER_CHUNK", 2)
    good = {"question": "Who is sitting?", "context": CONTEXT}
    too_long = {"question": "Who " * 400, "context": CONTEXT * 20}
    source = write_jsonl(tmp_path / "pairs.jsonl", [good, "", good, good, good, "", too_long, good])
    status, _, err = run(capsys, "ask", "--model", tiny_checkpoint, "--input", source)
    check_user_error(status, err, f"{source}:7: the question has ", "tokens")
    assert "question 4" not in err and "question 0" not in err


@pytest.mark.parametrize(
    ("arguments", "phrase"),
    [
        (["--question", "Who?", "--context", "Bob.", "--output", "answers.jsonl"], "--output goes with --input"),
        (["--input", "pairs.jsonl", "--json"], "--json goes with --question"),
    ],
)
def test_ask_refuses_options_that_would_do_nothing(capsys, tmp_path, tiny_checkpoint, monkeypatch, arguments, phrase):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    status, out, err = run(capsys, "ask", "--model", tiny_checkpoint, *arguments)
    check_user_error(status, err, phrase)
    assert out == "" and not (tmp_path / "answers.jsonl").exists()


# --------------------------------------------------------------------------- #
# Errors: user errors are one line, bugs keep their traceback
# --------------------------------------------------------------------------- #


def test_debug_shows_the_traceback_of_a_user_error(capsys, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nowhere"):
        main(["--debug", "ask", "--model", str(tmp_path / "nowhere"), "--question", "Who?", "--context", "Bob."])


@pytest.mark.parametrize("error", [TypeError("a bug"), KeyError("a bug"), AttributeError("a bug")])
def test_programming_errors_are_not_turned_into_user_errors(capsys, monkeypatch, tiny_checkpoint, error):
    import distilqa.cli as cli

    def broken(args):
        raise error

    monkeypatch.setattr(cli, "run_ask", broken)
    with pytest.raises(type(error)):
        main(["ask", "--model", str(tiny_checkpoint), "--question", "Who?", "--context", "Bob."])
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- #
# No weights, no network
# --------------------------------------------------------------------------- #


def test_ask_default_model_offline_exits_2_naming_download(capsys, offline):
    status, out, err = run(capsys, "ask", "--question", "q", "--context", "c")
    check_user_error(status, err, "distilqa download")
    assert out == ""


def test_download_offline_exits_2(capsys, offline):
    status, out, err = run(capsys, "download")
    check_user_error(status, err, "could not download", "distilbert/distilbert-base-cased-distilled-squad")
    assert out == ""


def test_real_command_offline_has_no_traceback(tmp_path):
    weights = tmp_path / "empty-weights"
    weights.mkdir()
    env = {
        **os.environ,
        "DISTILQA_WEIGHTS_DIR": str(weights),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
    }
    script = Path(sys.executable).with_name("distilqa")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "distilqa.cli"]
    result = subprocess.run(
        [*command, "ask", "--question", "q", "--context", "c"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "distilqa download" in result.stderr
    assert result.stderr.startswith("distilqa: error: ")
    assert result.stdout == ""


# --------------------------------------------------------------------------- #
# evaluate
# --------------------------------------------------------------------------- #


def test_evaluate_then_rescore_predictions(capsys, tmp_path, tiny_checkpoint, squad_file):
    predictions = tmp_path / "preds.json"
    status, out, _ = run(
        capsys,
        "evaluate",
        "--model",
        tiny_checkpoint,
        "--data",
        squad_file,
        "--limit",
        "5",
        "--predictions-out",
        predictions,
    )
    assert status == 0
    scores = json.loads(out)
    assert set(scores) == EVALUATE_KEYS
    assert scores["questions"] == 5
    assert 0.0 <= scores["exact_match"] <= scores["f1"] <= 100.0
    assert scores["questions_per_second"] > 0 and scores["seconds"] >= 0
    written = json.loads(predictions.read_text(encoding="utf-8"))
    assert isinstance(written, dict) and sorted(written) == ["q1", "q2", "q3", "q4", "q5"]
    assert all(isinstance(answer, str) and answer for answer in written.values())
    contexts = {qa["id"]: p["context"] for a in SQUAD["data"] for p in a["paragraphs"] for qa in p["qas"]}
    assert all(answer in contexts[key] for key, answer in written.items())

    status, out, _ = run(capsys, "evaluate", "--predictions", predictions, "--data", squad_file, "--limit", "5")
    assert status == 0
    rescored = json.loads(out)
    assert set(rescored) == EVALUATE_KEYS, "one JSON shape in both modes"
    assert rescored["questions"] == 5 and rescored["missing"] == 0 and rescored["answered"] == 5
    assert rescored["seconds"] is None and rescored["questions_per_second"] is None
    assert rescored["exact_match"] == scores["exact_match"]
    assert rescored["f1"] == scores["f1"]


def test_evaluate_known_predictions(capsys, tmp_path, squad_file):
    predictions = tmp_path / "preds.json"
    predictions.write_text(
        json.dumps({"q1": "Denver Broncos", "q2": "the Denver Broncos!", "q3": "Carolina", "q4": "Santa Clara"}),
        encoding="utf-8",
    )
    status, out, _ = run(capsys, "evaluate", "--predictions", predictions, "--data", squad_file, "--limit", "5")
    assert status == 0
    scores = json.loads(out)
    # q1, q2 exact; q3 F1 2/3 (1 of 2 gold tokens); q4 wrong; q5 missing.
    assert scores == {
        "exact_match": 40.0,
        "f1": pytest.approx(100 * (2 + 2 / 3) / 5),
        "questions": 5,
        "answered": 4,
        "missing": 1,
        "seconds": None,
        "questions_per_second": None,
    }


@pytest.mark.skipif(not SQUAD_FILE.exists(), reason=f"SQuAD dev set not found at {SQUAD_FILE}")
def test_evaluate_squad_zip(capsys, tmp_path, tiny_checkpoint):
    predictions = tmp_path / "preds.json"
    status, out, _ = run(
        capsys,
        "evaluate",
        "--model",
        tiny_checkpoint,
        "--data",
        SQUAD_FILE,
        "--limit",
        "5",
        "--predictions-out",
        predictions,
    )
    assert status == 0
    scores = json.loads(out)
    assert scores["questions"] == 5
    assert len(json.loads(predictions.read_text(encoding="utf-8"))) == 5
    status, out, _ = run(capsys, "evaluate", "--predictions", predictions, "--data", SQUAD_FILE, "--limit", "5")
    assert status == 0
    assert json.loads(out)["f1"] == scores["f1"]


@pytest.mark.parametrize(
    ("arguments", "phrase"),
    [
        (["--limit", "0"], "--limit"),
        (["--data", "missing.json"], "missing.json"),
        (["--predictions", "missing-preds.json"], "missing-preds.json"),
    ],
)
def test_evaluate_bad_arguments_exit_2(capsys, tmp_path, monkeypatch, tiny_checkpoint, squad_file, arguments, phrase):
    monkeypatch.chdir(tmp_path)
    data = [] if "--data" in arguments else ["--data", str(squad_file)]
    model = [] if "--predictions" in arguments else ["--model", tiny_checkpoint]
    status, _, err = run(capsys, "evaluate", *model, *data, *arguments)
    check_user_error(status, err, phrase)


@pytest.mark.parametrize(
    "extra",
    [["--model", "somewhere"], ["--dtype", "bfloat16"], ["--compile"], ["--batch-size", "4"], ["--device", "cuda"]],
)
def test_evaluate_predictions_refuses_model_options(capsys, tmp_path, squad_file, extra):
    predictions = tmp_path / "preds.json"
    predictions.write_text(json.dumps({"q1": "Denver Broncos"}), encoding="utf-8")
    status, out, err = run(capsys, "evaluate", "--predictions", predictions, "--data", squad_file, *extra)
    check_user_error(status, err, "--predictions scores a file without a model", extra[0])
    assert out == ""
    status, _, err = run(
        capsys, "evaluate", "--predictions", predictions, "--data", squad_file, "--predictions-out", tmp_path / "x"
    )
    check_user_error(status, err, "--output writes a model's predictions")


def test_evaluate_bad_predictions_file_exits_2(capsys, tmp_path, squad_file):
    predictions = tmp_path / "preds.json"
    predictions.write_text('["not", "an", "object"]', encoding="utf-8")
    status, _, err = run(capsys, "evaluate", "--predictions", predictions, "--data", squad_file)
    check_user_error(status, err, "preds.json")


# --------------------------------------------------------------------------- #
# verify
# --------------------------------------------------------------------------- #


def test_verify_published_checkpoint_passes(capsys, published_checkpoint):
    status, out, _ = run(capsys, "verify", "--model", published_checkpoint)
    assert status == 0, out
    assert "PASS" in out and "FAIL" not in out


def test_verify_missing_checkpoint_exits_2(capsys, tmp_path):
    status, _, err = run(capsys, "verify", "--model", tmp_path / "nowhere")
    check_user_error(status, err, "nowhere")


def test_verify_takes_the_model_options_of_the_other_commands(capsys, tiny_checkpoint):
    status, out, _ = run(
        capsys,
        "verify",
        "--model",
        tiny_checkpoint,
        "--attn-implementation",
        "sdpa",
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
    )
    assert status == 0, out
    assert out.startswith(f"checkpoint {tiny_checkpoint}, attention sdpa, dtype bfloat16")


# --------------------------------------------------------------------------- #
# argparse: help and unknown commands
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("command", ["download", "ask", "evaluate", "verify", "serve", "export", "explain"])
def test_subcommand_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: distilqa {command}")
    assert "--help" in out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("download", "ask", "evaluate", "verify"))


@pytest.mark.parametrize("argv", [["frobnicate"], [], ["ask", "--no-such-option"], ["ask", "--top-k", "many"]])
def test_bad_command_line_exits_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: distilqa") and "error:" in err


# --------------------------------------------------------------------------- #
# one output policy, devices, tokenizers that fit
# --------------------------------------------------------------------------- #


def command_line() -> list[str]:
    script = Path(sys.executable).with_name("distilqa")
    return [str(script)] if script.exists() else [sys.executable, "-m", "distilqa.cli"]


def run_command(cwd: Path, *argv: object) -> subprocess.CompletedProcess:
    """The real ``distilqa`` command, as a user runs it."""
    return subprocess.run(
        [*command_line(), *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=600, check=False
    )


def check_one_line_error(result: subprocess.CompletedProcess, *phrases: str) -> None:
    check_user_error(result.returncode, result.stderr, *phrases)
    assert result.stderr.strip().count("\n") == 0 or all(
        "%|" in line for line in result.stderr.strip().splitlines()[:-1]
    ), result.stderr


def writing_commands(tmp_path: Path, squad_file: Path, source: Path) -> dict[str, list[object]]:
    """Each command that writes, with a model that is not there: checks that come first never reach it."""
    model = tmp_path / "no-model-here"
    return {
        "ask": ["ask", "--model", model, "--input", source],
        "ask --ray": ["ask", "--model", model, "--input", source, "--ray"],
        "evaluate": ["evaluate", "--model", model, "--data", squad_file],
        "heads": ["heads", "--model", model, "--data", squad_file],
        "export": ["export", "--model", model],
        "explain": ["explain", "--model", model, "--question", "Who?", "--context", "Bob."],
        "train": ["train", "--model", model, "--data", squad_file],
    }


@pytest.mark.parametrize("command", ["ask", "ask --ray", "evaluate", "heads", "export", "explain"])
def test_an_existing_output_is_refused_before_work_and_kept(capsys, tmp_path, squad_file, command):
    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    existing = tmp_path / "existing"
    if command in ("heads", "export", "explain"):  # these write folders
        existing.mkdir()
        (existing / "kept.txt").write_bytes(b"old\r\n")
        before = {path.name: path.read_bytes() for path in existing.iterdir()}
    else:
        existing.write_bytes(b"old answers\r\n")
    argv = writing_commands(tmp_path, squad_file, source)[command]
    status, out, err = run(capsys, *argv, "--output", existing)
    check_user_error(status, err, f"--output {existing} already exists", "--overwrite")
    assert out == ""
    if existing.is_dir():
        assert {path.name: path.read_bytes() for path in existing.iterdir()} == before
    else:
        assert existing.read_bytes() == b"old answers\r\n"
    # With --overwrite the checks pass and the command goes on, to the model that is not there.
    status, _, err = run(capsys, *argv, "--output", existing, "--overwrite")
    check_user_error(status, err, "no-model-here")


@pytest.mark.parametrize(
    ("command", "old_spelling"),
    [("evaluate", "--predictions-out"), ("heads", "--out"), ("export", "--onnx"), ("explain", "--out")],
)
def test_old_output_spellings_still_work_and_are_hidden(capsys, tmp_path, squad_file, command, old_spelling):
    from distilqa.cli import build_parser

    argv = writing_commands(tmp_path, squad_file, tmp_path / "pairs.jsonl")[command]
    args = build_parser().parse_args([*map(str, argv), old_spelling, "target"])
    assert args.output == Path("target") and args.overwrite is False
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # one line: argparse wraps at the terminal width
    assert f"{old_spelling}: older spelling, deprecated" in help_text
    assert "--output" in help_text and "--overwrite" in help_text
    usage = help_text.split("options:")[0]
    assert f"{old_spelling} " not in usage  # hidden from the usage line


def test_every_writing_command_takes_the_same_output_options(capsys, tmp_path, squad_file):
    from distilqa.cli import build_parser

    for name, argv in writing_commands(tmp_path, squad_file, tmp_path / "pairs.jsonl").items():
        args = build_parser().parse_args([*map(str, argv), "--output", "o", "--overwrite"])
        assert (args.output, args.overwrite) == (Path("o"), True), name


def test_output_may_not_be_the_input(tmp_path):
    source = write_jsonl(tmp_path / "same.jsonl", PAIRS[:2])
    before = source.read_bytes()
    for extra in ([], ["--overwrite"], ["--ray"]):
        result = run_command(tmp_path, "ask", "--input", "same.jsonl", "--output", "same.jsonl", *extra)
        check_one_line_error(result, "--output same.jsonl is also an input")
        assert source.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["same.jsonl"]  # no temporary file left


def test_evaluate_output_in_a_missing_folder_is_made(capsys, tmp_path, tiny_checkpoint, squad_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", "--model", tiny_checkpoint, "--data", squad_file, "--limit", "2"]
    status, _, err = run(capsys, *argv, "--output", Path("nodir") / "p.json")
    assert status == 0, err
    assert set(json.loads((tmp_path / "nodir" / "p.json").read_text(encoding="utf-8"))) == {"q1", "q2"}
    assert sorted(path.name for path in (tmp_path / "nodir").iterdir()) == ["p.json"]


def test_evaluate_output_that_cannot_be_made_fails_before_the_model_loads(tmp_path, squad_file):
    (tmp_path / "afile").write_text("a file, not a folder", encoding="utf-8")
    result = run_command(
        tmp_path, "evaluate", "--model", "no-model-here", "--data", squad_file, "--output", "afile/p.json"
    )
    check_one_line_error(result, "--output afile/p.json")  # the path as typed
    assert "no-model-here" not in result.stderr
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "a file, not a folder"


def test_overwrite_goes_with_output(capsys, tmp_path):
    status, _, err = run(capsys, "ask", "--question", "Who?", "--context", "Bob.", "--overwrite")
    check_user_error(status, err, "--overwrite goes with")


def test_an_unusable_device_is_one_line_before_loading(tmp_path, squad_file):
    torch = pytest.importorskip("torch")
    devices = ["nonsense", "meta"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        result = run_command(
            tmp_path, "ask", "--model", "no-model-here", "--question", "Who?", "--context", "Bob.", "--device", device
        )
        check_one_line_error(result, f"device {device!r}")
        assert "no-model-here" not in result.stderr


@pytest.mark.parametrize("command", ["ask", "evaluate", "heads", "export", "explain", "verify"])
def test_every_model_command_checks_its_device_first(capsys, tmp_path, squad_file, command):
    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    argv = {**writing_commands(tmp_path, squad_file, source), "verify": ["verify", "--model", tmp_path / "none"]}
    extra = [] if command in ("ask", "verify") else ["--output", tmp_path / "new-output"]
    if command == "ask":
        argv[command] = [*argv[command], "--output", tmp_path / "answers.jsonl"]
    status, _, err = run(capsys, *argv[command], *extra, "--device", "nonsense")
    check_user_error(status, err, "unknown device 'nonsense'")
    assert not (tmp_path / "new-output").exists()


def stub_tokenizer_checkpoint(directory: Path, weights_from: Path) -> Path:
    """The weights of ``weights_from`` beside a vocabulary of the 5 special tokens only."""
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((weights_from / name).read_bytes())
    (directory / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    return directory


def test_a_tokenizer_that_does_not_fit_is_refused_and_fails_verify(capsys, tmp_path, tiny_checkpoint):
    stub = stub_tokenizer_checkpoint(tmp_path / "stub", tiny_checkpoint)
    status, out, err = run(capsys, "ask", "--model", stub, "--question", "Who?", "--context", CONTEXT)
    check_user_error(status, err, "the tokenizer does not fit the model", "[UNK]")
    assert out == ""
    status, out, _ = run(capsys, "verify", "--model", stub)
    assert status == 1, out
    assert "tokenizer: FAIL" in out and out.rstrip().endswith("FAIL: the tokenizer does not fit the model")
    status, out, _ = run(capsys, "verify", "--model", tiny_checkpoint)
    assert status == 0, out
    assert "tokenizer: PASS" in out


def test_verify_takes_the_dtype_names_every_command_takes(capsys, tiny_checkpoint):
    status, out, _ = run(capsys, "verify", "--model", tiny_checkpoint, "--dtype", "bf16")
    assert status == 0, out
    assert "dtype bfloat16" in out.splitlines()[0]
    status, _, err = run(capsys, "verify", "--model", tiny_checkpoint, "--dtype", "float8")
    check_user_error(status, err, "unknown dtype 'float8'")
