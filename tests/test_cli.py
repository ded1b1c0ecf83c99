"""CLI bad input: every user mistake is one line on stderr naming the problem, exit code 2, nothing half-written."""

import subprocess
import sys

import pytest

from ddm_node.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    assert main(["partition", "--experts", "3", "--steps", "5", "--out", str(out)]) == 0
    return out


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_wrong_dataset_spec(capsys, tmp_path):
    code, err = run(capsys, "partition", "--dataset", "cifar-10", "--out", str(tmp_path / "p"))
    assert code == 2
    assert "cifar-10" in one_line(err) and "npz:" in err
    assert not (tmp_path / "p" / "plan.json").exists()


def test_missing_debian_dataset(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DDM_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    code, err = run(capsys, "partition", "--config", "configs/fashion-mnist.yaml", "--out", str(tmp_path / "p"))
    assert code == 2
    assert "dataset-fashion-mnist" in one_line(err)


@pytest.mark.parametrize("text, needle", [("train:\n  stepz: 5\n", "unknown config key 'train.stepz'"),
                                          ("train:\n  steps: many\n", "train.steps must be an integer")])
def test_bad_config(capsys, tmp_path, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    code, err = run(capsys, "partition", "--config", str(cfg), "--out", str(tmp_path / "p"))
    assert code == 2
    line = one_line(err)
    assert needle in line and str(cfg) in line


def test_shard_out_of_range(capsys, plan_dir, tmp_path):
    code, err = run(capsys, "train-expert", "--plan", str(plan_dir), "--shard", "7", "--out", str(tmp_path / "w"))
    assert code == 2
    assert "shard 7" in one_line(err) and "3 shards" in err
    assert not (tmp_path / "w").exists()


def test_plan_missing(capsys, tmp_path):
    code, err = run(capsys, "train-expert", "--plan", str(tmp_path / "none"), "--shard", "0", "--out", str(tmp_path))
    assert code == 2 and "plan" in one_line(err)


def test_keygen_refuses_overwrite(capsys, tmp_path):
    key = tmp_path / "k.pem"
    assert main(["keygen", "--out", str(key)]) == 0
    assert (key.stat().st_mode & 0o777) == 0o600
    before = key.read_bytes()
    code, err = run(capsys, "keygen", "--out", str(key))
    assert code == 2 and "refusing to overwrite" in one_line(err)
    assert key.read_bytes() == before


def test_bad_flag_value_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train-expert", "--plan", "x", "--shard", "-1", "--out", "y"])
    assert exc.value.code == 2
    assert "--shard must be >= 0" in capsys.readouterr().err


@pytest.mark.multiproc
def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "ddm_node.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "ddm-node" in res.stdout
