"""bench.partition on a small N: it writes the features, runs the real `ddm-node partition --features npy:PATH` in a
child process and records time, peak memory and how well the shards respect the synthetic blobs. 60,000 vectors
are past MINIBATCH_MIN_SAMPLES, so this is the large-data path (streamed features, mini-batch fine pass)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def row(body: str, label: str) -> str:
    line = next((line for line in body.splitlines() if line.startswith(f"| {label}")), None)
    assert line is not None, f"no {label!r} row in:\n{body}"
    return line.split("|")[2].strip()


@pytest.mark.timeout(300)
def test_partition_bench_small_run_records_its_figures(tmp_path):
    doc = tmp_path / "B.md"
    res = subprocess.run([sys.executable, "-m", "bench.partition", "--quick", "--n", "60000", "--dim", "96",
                          "--doc", str(doc), "--tmp", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=280)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    ratio = float(re.fullmatch(r"partition wall time / 10-minute budget ratio: (\d+\.\d{3})", last).group(1))
    assert 0 < ratio < 1
    text = doc.read_text()
    body = text[text.index("<!-- BEGIN bench.partition -->"):text.index("<!-- END bench.partition -->")]
    assert "python -m bench.partition --quick --n 60000 --dim 96" in body
    assert row(body, "features file").startswith("60,000 x 96 float32")
    assert re.search(r"\| stage: npy features 60000 x 96 -> 32 dims \| [0-9.]+ s \|", body), body
    assert re.search(r"\| stage: 60000 samples -> 244 fine clusters -> 8 shards \| [0-9.]+ s \|", body), body
    peak = float(row(body, "peak resident memory").split()[0])
    assert 0.01 < peak < 4.0  # GiB: a python with numpy and sklearn, far below the budget
    assert float(row(body, "blob purity")) > 0.99  # 64 well-separated blobs: none split between shards
    smallest, largest = (int(v.replace(",", "")) for v in row(body, "shard sizes").split(" .. "))
    assert 0 < smallest <= largest < 60000
    assert [p.name for p in tmp_path.iterdir()] == ["B.md"]  # the bench removed its inputs
