from __future__ import annotations

from pdserve.deploy.cli import main


def test_make_model_then_generate(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["make-model", "--preset", "tiny", "--out", str(out)]) == 0
    assert (out / "config.json").is_file()
    code = main(
        [
            "generate",
            "--model",
            str(out),
            "--max-tokens",
            "5",
            "--ignore-eos",
            "--chat",
            "Hello",
            "Bye",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "'Hello' -> 5 tokens (length)" in text and "'Bye' -> 5 tokens" in text
    assert "10 tokens in" in text


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 2
    assert "no config.json" in capsys.readouterr().err
