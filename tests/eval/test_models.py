"""`python -m sdturbo.eval.models`: a work dir that cannot give a models directory is one line, exit 2."""

from sdturbo.eval.models import main


def test_absent_or_unfinished_workdir_is_one_line(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path / "missing"), "--out", str(tmp_path / "models")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --workdir {tmp_path / 'missing'} is not a folder")
    assert main(["--workdir", str(tmp_path), "--out", str(tmp_path / "models")]) == 2
    assert "stage 'clip' has not finished" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()
