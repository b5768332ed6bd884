"""`mpcompile formats` prints the registry, reads specs, and reports bad ones with exit code 2."""
from mpcompile.cli import main
from mpcompile.formats import names


def test_formats_lists_every_registered_format(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in out[2:]]
    assert listed == names()
    assert "448" in next(line for line in out if line.startswith("fp8_e4m3 "))


def test_formats_describes_specs_and_rejects_unknown(capsys):
    assert main(["formats", "e5m10", "p3109(8,3)"]) == 0
    out = capsys.readouterr().out
    assert "65504" in out and "49152" in out
    assert main(["formats", "fp8_e4m4"]) == 2
    assert "did you mean fp8_e4m3" in capsys.readouterr().err
