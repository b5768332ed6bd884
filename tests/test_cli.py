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


def test_check_summarises_a_policy_and_reports_its_errors(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("version: 1\nname: demo\ndefault: {input: fp8_e4m3, forward: {acc: fp16}}\n"
                    "rules:\n  - match: {last: true}\n    keep: fp32\n")
    bad.write_text("version: 1\ndefault:\n  inptu: bf16\n")
    assert main(["check", str(good)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{good}: ok: policy 'demo'", "  default: input=fp8_e4m3, forward=(acc=fp16)",
                   f"  rules[0] ({good}:5:5): keep fp32"]
    assert main(["check", str(bad)]) == 2
    assert f"{bad}:3:3: unknown key 'inptu' in default" in capsys.readouterr().err


def test_inspect_prints_the_table_or_the_lock(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nname: p\ndefault: {weight: bf16}\n")
    assert main(["inspect", "test_compiler:SmallCNN", "--policy", str(policy), "--input-shape", "1,3,16,16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"policy 'p' ({policy}), level 0, captured by fx, eval mode"
    assert [line.split()[:6] for line in lines[3:]] == [
        ["conv1", "Conv2d", "conv1", "1x8x16x16", "-", "bf16"], ["conv2", "Conv2d", "conv2", "1x8x7x7", "-", "bf16"],
        ["fc", "Linear", "fc", "1x10", "-", "bf16"]]
    assert main(["inspect", "test_compiler:SmallCNN", "--policy", str(policy), "--input-shape", "1,3,16,16",
                 "--format", "json"]) == 0
    assert '"name": "p.lock"' in capsys.readouterr().out
    assert main(["inspect", "resnet81"]) == 2
    assert "did you mean 'resnet18'" in capsys.readouterr().err
    assert main(["inspect", "lenet5", "--policy", "hfp8", "--input-shape", "1,1,8,8"]) == 0
    assert [line.split()[4:6] for line in capsys.readouterr().out.splitlines()[3:]] == [
        ["fp32", "fp32"], *[["e4m3(bias=11,inf=false,nan=none):sat"] * 2] * 3, ["fp32", "fp32"]]  # hfp8 keeps the ends


def test_inspect_calibrates_and_draws(capsys):
    args = ["inspect", "test_compiler:SmallCNN", "--policy", "version: 1\ndefault: {weight: fp8_e4m3}\n",
            "--input-shape", "2,3,16,16"]
    assert main(args) == 0
    assert [line.split()[-4:] for line in capsys.readouterr().out.splitlines()[3:]] == [["default", "-", "-", "-"]] * 3
    assert main(args + ["--calibrate"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[3:]]
    assert all(float(r[-3]) >= 1 and float(r[-1]) > 10 for r in rows)  # kappa p99, SQNR dB
    assert main(args + ["--format", "dot"]) == 0 and capsys.readouterr().out.startswith('digraph "<string>" {')
    assert main(args + ["--format", "svg"]) == 0 and capsys.readouterr().out.startswith("<svg ")


def test_inspect_says_each_warning_once(capsys):
    idle = "version: 1\nrules:\n  - match: {type: Conv3d}\n    input: bf16\n"
    text = "rules[0] (<string>:3:5): matches no op of this model"
    assert main(["inspect", "lenet5", "--input-shape", "2,1,8,8", "--policy", idle]) == 0
    out, err = capsys.readouterr()
    assert out.count(text) == 1 and text not in err  # the table lists it
    assert main(["inspect", "lenet5", "--input-shape", "2,1,8,8", "--policy", idle, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert text not in out and err.count(text) == 1
