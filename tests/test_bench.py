"""The benchmark scripts: shared helpers (fast), one tiny smoke run (fast), and each script's --quick mode (slow)."""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.common import interleave, interleaved, markdown_table, median_ratio, read_section, write_section  # noqa: E402

RATIO_LINE = re.compile(r"^.+ ratio: (\d+\.\d{3})$")

# Bounds on each script's printed ratio, (low, high), from what README.md states or, where it states nothing,
# from quick runs measured here (2 cores, load average 4-9, 3-6 runs each); each is about 1.5x outside the
# measured spread, and the high ends stay near what the ratio can physically reach.
RATIO_BOUNDS = {
    # README: "The daemon costs about 3% of training throughput" (the full run: 0.969). A quick run has only
    # 2 checkpoint intervals: 0.980, 0.927, 0.937, 1.010, 0.994, 0.925, 0.909, 1.011, 0.863, 0.955 and one below
    # 0.88 in 11 runs (median 0.95). It cannot hold 0.97, so it is held to a cost of at most 20% (1.5x the
    # worst quick cost measured, 13.7%).
    "bench.train_overhead": (0.80, 1.15),
    # top-1 ensemble / single expert images/s (README: no figure; BENCHMARKS.md goal >= 0.9 in the full run).
    # --quick: 0.87, 0.90, 1.21, 1.20, 0.66, 0.57 (2 repetitions each: noisy). The ensemble does the expert's work
    # plus routing, so the ratio sits at or below 1 up to that noise.
    "bench.sampling": (0.35, 1.60),
    # fetch_file / raw TCP throughput (BENCHMARKS.md goal >= 0.6 in the full run). --quick (16 MiB, 2 repetitions,
    # load 3-18): 1.14, 0.49, 0.34, 0.53, 0.34. A 16 MiB raw transfer takes tens of ms, so one load spike can put a
    # quick ratio above 1.
    "bench.transfer": (0.15, 1.75),
}
# The sampling smoke run (16 images, one ODE step, experts trained 10 steps): routing overhead dominates;
# measured 0.48, 0.70, 0.68, 0.60, 0.68, 0.54.
SMOKE_SAMPLING_BOUNDS = (0.30, 1.10)


# ---------------------------------------------------------------- bench.common


def test_write_section_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "B.md"
    write_section(doc, "bench.a", "A one", intro="# Title\n\nintro text")
    write_section(doc, "bench.b", "B one\n\n| x |\n|---|\n| 1 |")
    write_section(doc, "bench.a", "A two")
    text = doc.read_text()
    assert text.startswith("# Title\n\nintro text\n")
    assert read_section(doc, "bench.a") == "A two\n"
    assert read_section(doc, "bench.b") == "B one\n\n| x |\n|---|\n| 1 |\n"
    assert "A one" not in text
    assert text.index("BEGIN bench.a") < text.index("BEGIN bench.b")  # replaced in place, order kept
    assert read_section(doc, "bench.c") is None
    assert [p.name for p in tmp_path.iterdir()] == ["B.md"]  # no temp file left behind


def test_write_section_keeps_text_outside_markers(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("# Hand-written\n\nkeep me\n")
    write_section(doc, "bench.x", "first")
    doc.write_text(doc.read_text() + "\ntrailing notes\n")
    write_section(doc, "bench.x", "second")
    text = doc.read_text()
    assert "keep me" in text and "trailing notes" in text and "second" in text and "first" not in text


def test_interleave_rotates_order_and_respects_budget():
    order: list[str] = []
    counter = itertools.count()

    def side(name):
        def run():
            order.append(name)
            return float(next(counter))
        return run

    vals = interleave({"a": side("a"), "b": side("b"), "c": side("c")}, reps=3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v) for k, v in vals.items()} == {"a": 3, "b": 3, "c": 3}
    # a zero budget stops after min_reps whole repetitions
    vals = interleave({"a": side("a"), "b": side("b")}, reps=10, budget_s=0.0, min_reps=2)
    assert len(vals["a"]) == len(vals["b"]) == 2


def test_interleaved_pairs_and_median_ratio():
    a, b = interleaved(lambda: 2.0, lambda: 4.0, reps=3)
    assert a == [2.0] * 3 and b == [4.0] * 3
    assert median_ratio([1.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == 3.0
    with pytest.raises(ValueError):
        median_ratio([1.0], [])


def test_markdown_table_formats_ratios_and_rates():
    table = markdown_table(["x", "y"], [["r", 0.97512], ["s", 12345.6], ["t", 42.25]])
    assert "| r | 0.975 |" in table and "| s | 12,346 |" in table and "| t | 42.2 |" in table


# ---------------------------------------------------------------- bench.transfer helpers


def test_transfer_bench_publishes_weights_as_the_checkpoint_does_and_sizes_tbf_bursts():
    import torch
    from safetensors.torch import load

    from bench.transfer import published
    from bench.transfer_links import Link

    x = torch.tensor([1.0, -2.5, 3.14159265, 1e-3, 0.0])
    got = load(published({"w": x}))["w"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, x.to(torch.bfloat16))  # what an expert file holds
    assert Link("100 Mbit/s", "100mbit", 100e6, 32).burst == "25000"  # 2 ms of the rate, in bytes
    assert Link("slow", "1mbit", 1e6, 1).burst == "4096"  # never under 32 kbit
    assert abs(Link("1 Gbit/s", "1gbit", 1e9, 256).mib_per_s - 119.2) < 0.1


# ---------------------------------------------------------------- scripts


def run_script(module: str, *args: str, timeout: float) -> list[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()


def check_output(lines: list[str], doc: Path, name: str, module: str, bounds: tuple[float, float]) -> float:
    m = RATIO_LINE.match(lines[-1])
    assert m, f"last line is not a ratio: {lines[-1]!r}"
    ratio = float(m.group(1))
    low, high = bounds
    assert low < ratio < high, f"{module}: ratio {ratio} outside ({low}, {high})"
    section = read_section(doc, name)
    assert section is not None
    assert f"`python -m {module} " in section and "load average" in section and "| " in section
    return ratio


@pytest.mark.slow  # 20-60 s of CPU; bench.sampling's code paths are the ensemble's, covered by test_router
@pytest.mark.multiproc
def test_sampling_smoke_with_tiny_sizes(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    lines = run_script("bench.sampling", "--quick", "--n", "16", "--steps", "1", "--expert-steps", "10",
                       "--router-steps", "10", "--cache-dir", str(tmp_path / "cache"), "--doc", str(doc),
                       timeout=120)
    check_output(lines, doc, "bench.sampling", "bench.sampling", SMOKE_SAMPLING_BOUNDS)
    section = read_section(doc, "bench.sampling")
    for row in ("expert 0 alone", "top1, learned router", "top1, centroid router", "top2, learned router",
                "full, centroid router"):
        assert f"| {row} |" in section


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("module, extra, timeout", [
    ("bench.transfer", [], 300),
    ("bench.sampling", [], 300),
    ("bench.train_overhead", [], 600),
])
def test_quick_mode(tmp_path, module, extra, timeout):
    doc = tmp_path / "BENCHMARKS.md"
    args = ["--quick", "--doc", str(doc), *extra]
    if module != "bench.train_overhead":
        args += ["--cache-dir", str(tmp_path / "cache")]
    lines = run_script(module, *args, timeout=timeout)
    check_output(lines, doc, module, module, RATIO_BOUNDS[module])
    if module == "bench.transfer":  # the three figures side by side; links measured or said why not
        section = read_section(doc, module)
        for row in ("| loopback: fetch_file / raw TCP", "| inference weights (", "| raw TCP + sha256"):
            assert row in section, row
        assert "| 100 Mbit/s link: fetch_file / link rate" in section or "| shaped links | >= 0.9 | – | not" in section


def test_routing_quick_shows_the_class_histogram_fixes_high_noise_routing():
    """bench.routing --quick: the class-aware centroid router routes noisy images far better than pixels alone,
    and its confidence matches its accuracy within 0.05 at every t (digits)."""
    lines = run_script("bench.routing", "--quick", timeout=300)
    assert RATIO_LINE.match(lines[-1]), lines[-1]
    acc: dict = {}
    gap: dict = {}  # confidence minus accuracy: the second table
    table = acc
    for line in lines:
        if line.startswith("Calibration"):
            table = gap
        elif line.startswith("| K="):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            table[tuple(cells[:2])] = [float(v) for v in cells[2:]]
    assert len(acc) == len(gap) == 12  # K=4 and K=8, six routers each
    for k in ("K=4", "K=8"):
        pixels, aware = acc[(k, "centroid, pixels")], acc[(k, "centroid, class-aware")]
        assert aware[-2] > pixels[-2] + 0.2  # t = 0.9: the label carries what the pixels no longer do
        assert all(0.0 <= a <= 1.0 for a in aware + pixels)
        assert max(abs(g) for g in gap[(k, "centroid, class-aware")][:-1]) <= 0.05
    assert any("patch 8 (1 token)" in line for line in lines)


def test_quality_runs_of_disjoint_seeds_merge_and_bad_files_are_one_line_errors(tmp_path):
    import json
    from dataclasses import asdict

    from bench.quality import Record, Settings, merge_runs

    def saved(name: str, seeds: list[int], budget: int = 100) -> Path:
        s = Settings("digits", budget, [4], seeds, [1.0], 10, 4, 10, "quick")
        recs = [Record(1, seed, 1.0, budget, 1.0, 0.0, "-", "top1", 2.0 + seed, 0.1, 0.5, 0.5, 1.0, 1.0)
                for seed in seeds]
        path = tmp_path / name
        path.write_text(json.dumps({"settings": asdict(s), "command": f"cmd {name}", "date": name,
                                    "records": [asdict(r) for r in recs]}))
        return path

    merged = merge_runs([saved("b", [1, 2]), saved("a", [0])])
    assert merged["settings"]["seeds"] == [0, 1, 2] and [r["seed"] for r in merged["records"]] == [1, 2, 0]
    assert merged["command"] == "cmd b ; cmd a" and merged["date"] == "b"
    with pytest.raises(SystemExit, match="settings differ"):
        merge_runs([saved("c", [0]), saved("d", [1], budget=200)])
    with pytest.raises(SystemExit, match="were already loaded"):
        merge_runs([saved("e", [0, 1]), saved("f", [1])])
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(SystemExit, match="junk.json: not a saved bench.quality run"):
        merge_runs([tmp_path / "junk.json"])


def test_quality_full_runs_keep_the_default_runs_section_and_files():
    from bench.quality import NAME, Settings

    def s(dataset: str, label: str) -> Settings:
        return Settings(dataset, 100, [4], [0], [1.0], 10, 4, 10, label)

    assert (s("digits", "default").tag, s("digits", "default").section) == ("digits", NAME)
    assert (s("digits", "full").tag, s("digits", "full").section) == ("digits-full", f"{NAME}.digits-full")
    assert s("fashion-mnist", "default").section == f"{NAME}.fashion-mnist"
    assert s("fashion-mnist", "full").tag == "fashion-mnist-full"


def test_quality_splits_give_every_arm_the_monoliths_images():
    from bench.quality import Settings

    s = Settings("fashion-mnist", 800, [4, 8], [0], [0.5, 1.0], 10, 4, 10, "default", split="paper")
    images = 800 * 64  # the monolith: N steps at batch B
    for k in (4, 8):
        for split in ("paper", "current"):
            assert s.steps(k, 1.0, split) * s.batch(64, k, split) * k == images
        assert (s.steps(k, 1.0, "paper"), s.batch(64, k, "paper")) == (800, 64 // k)
        assert (s.steps(k, 0.5, "current"), s.batch(64, k, "current")) == (400 // k, 64)
    assert (s.steps(1, 1.0, "current"), s.batch(64, 1, "paper")) == (800, 64)
    assert s.other == "current" and Settings("digits", 8, [4], [0], [1.0], 1, 1, 1, "quick").split == "current"


def test_quality_ratio_interval_is_paired():
    """Ensemble FDs that are 0.8x the monolith's in every bootstrap round give a tight interval at 0.8, however
    much the rounds vary together; unpaired draws would spread it."""
    import numpy as np

    from bench.quality import Record, ratio_ci

    def rec(k: int, seed: int, boot: list[float]) -> Record:
        return Record(k, seed, 1.0, 10, 1.0, 0.0, "-", "top1", float(np.mean(boot)), 0.0, 0.5, 0.5, 1.0, 1.0,
                      boot=boot)

    rng = np.random.default_rng(0)
    mono, ens = [], []
    for seed in range(3):
        base = list(rng.uniform(5.0, 15.0, 100))  # large shared noise of the held-out rows
        mono.append(rec(1, seed, base))
        ens.append(rec(4, seed, [0.8 * v for v in base]))
    ratio, lo, hi = ratio_ci(ens, mono)
    assert ratio == pytest.approx(0.8) and lo == pytest.approx(0.8) and hi == pytest.approx(0.8)
    shuffled = [rec(4, r.seed, list(rng.permutation(r.boot))) for r in ens]
    _, lo2, hi2 = ratio_ci(shuffled, mono)
    assert hi2 - lo2 > 0.1  # the same numbers without the pairing
    assert math.isnan(ratio_ci([rec(4, 0, [])], [rec(1, 0, [])])[1])  # no draws: no interval


def test_quality_runs_of_the_two_splits_join_side_by_side(tmp_path):
    import json
    from dataclasses import asdict

    from bench.quality import Record, Settings, merge_runs

    def saved(split: str, mono_fd: float = 2.0) -> Path:
        s = Settings("digits", 100, [4], [0], [1.0], 10, 4, 10, "quick", split=split)
        recs = [Record(1, 0, 1.0, 100, 1.0, 0.0, "-", "top1", mono_fd, 0.1, 0.5, 0.5, 1.0, 1.0, "-"),
                Record(4, 0, 1.0, 100, 1.0, 0.0, "centroid", "top1", 1.5, 0.1, 0.5, 0.5, 1.0, 1.0, split)]
        path = tmp_path / f"{split}-{mono_fd}.json"
        path.write_text(json.dumps({"settings": asdict(s), "command": f"cmd {split}", "date": split,
                                    "records": [asdict(r) for r in recs]}))
        return path

    merged = merge_runs([saved("paper"), saved("current")])
    assert merged["settings"]["split"] == "paper" and merged["settings"]["compare"] is True
    assert sorted(r["split"] for r in merged["records"]) == ["-", "current", "paper"]  # one monolith
    with pytest.raises(SystemExit, match="monolith .* differs"):
        merge_runs([saved("paper"), saved("current", mono_fd=2.5)])
