"""Shared helpers for the benchmark scripts.

Every benchmark measures a *ratio* side by side in one run (A/B/A/B interleaved repetitions, median
ratio), because the machine is shared and absolute numbers drift with load. This module gives:

- `machine_info()` / `load_average()`: what to print next to a measured number;
- `interleaved(a, b, reps)`: run two measurement callables alternately and collect both series;
- `interleave({name: fn}, reps)`: the same for any number of sides (rotating order);
- `median_ratio(a_vals, b_vals)`: the median of the per-pair ratios a_i / b_i;
- `Timer`: a tiny perf_counter context manager;
- `write_section(doc, name, markdown)`: replace only this script's section of a markdown file
  (between `<!-- BEGIN name -->` and `<!-- END name -->` markers), appending it if absent, atomically;
- `command_line()`: the exact command that produced the numbers, for the doc;
- `markdown_table(header, rows)`, `section_header(...)`: formatting;
- `trained_digits(...)`: a small trained K-expert digits ensemble (plan, checkpoints with training state,
  bundle with the learned router), cached in the temp dir by config hash and shared between scripts.

Never edit a benchmark doc by hand while scripts may be writing to it; use `write_section`, which
serialises writers with a lock.

Typical use in a script::

    from bench.common import BENCHMARKS_MD, write_section, section_header, markdown_table
    md = section_header("bench.scale", "Scaling") + markdown_table(["n", "ratio"], rows) + reading
    write_section(BENCHMARKS_MD, "bench.scale", md)
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"
RESULTS_MD = REPO_ROOT / "docs" / "RESULTS.md"


# ---------------------------------------------------------------- machine / load

def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages (zeros where the OS has none)."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return (0.0, 0.0, 0.0)


def load_str() -> str:
    """Load average as a short string, e.g. '1.93 / 2.10 / 2.20 (1/5/15 min)'."""
    one, five, fifteen = load_average()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min)"


def machine_info() -> str:
    """One line describing the machine: cores, CPU model, Python and torch versions, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_v = f", torch {torch.__version__}"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        torch_v = ""
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}{torch_v}, "
            f"load average {load_str()}")


def now_str() -> str:
    """UTC timestamp for the doc."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """The command that is running, as the user would type it (`python -m bench.x --flag`)."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        head = ["python", "-m", spec.name.removesuffix(".__main__")]
        return shlex.join(head + argv[1:])
    return shlex.join(["python"] + argv)


# ---------------------------------------------------------------- timing

@dataclass
class Timer:
    """`with Timer() as t: ...; t.seconds` (perf_counter wall time)."""

    seconds: float = 0.0
    _t0: float = field(default=0.0, repr=False)

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


def interleaved(a: Callable[[], float], b: Callable[[], float], reps: int,
                warmup: int = 0) -> tuple[list[float], list[float]]:
    """Call a, b, a, b, ... `reps` times each (after `warmup` untimed pairs); return both value lists.

    Each callable returns its own measurement (e.g. a throughput); alternating them means a load
    spike from another process hits both sides about equally.
    """
    for _ in range(warmup):
        a()
        b()
    a_vals: list[float] = []
    b_vals: list[float] = []
    for i in range(reps):
        # Alternate which side goes first so neither always runs right after the other's cache warm-up.
        if i % 2 == 0:
            a_vals.append(a())
            b_vals.append(b())
        else:
            b_vals.append(b())
            a_vals.append(a())
    return a_vals, b_vals


def interleave(measures: dict[str, Callable[[], float]], reps: int, warmup: int = 0,
               budget_s: float | None = None, min_reps: int = 2) -> dict[str, list[float]]:
    """Like `interleaved` for any number of sides: each repetition runs every callable once, in an order
    rotated by one each time (A B C, B C A, C A B, ...). Returns name -> list of values (one per rep).

    With `budget_s`, stops early (after at least `min_reps` whole repetitions) when another repetition
    as long as the slowest so far would end past the budget: a loaded machine gets fewer pairs, not a
    run that never ends. Every list always has the same length.
    """
    names = list(measures)
    start = time.monotonic()
    for _ in range(warmup):
        for name in names:
            measures[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    longest = 0.0
    for i in range(reps):
        t0 = time.monotonic()
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(measures[name]())
        longest = max(longest, time.monotonic() - t0)
        if (budget_s is not None and i + 1 >= min_reps and i + 1 < reps
                and time.monotonic() + longest - start > budget_s):
            break
    return out


def median_ratio(a_vals: Sequence[float], b_vals: Sequence[float]) -> float:
    """Median of the pairwise ratios a_i / b_i (pairs measured next to each other)."""
    if len(a_vals) != len(b_vals) or not a_vals:
        raise ValueError("median_ratio needs two equally long, non-empty series")
    return statistics.median(x / y for x, y in zip(a_vals, b_vals))


def median(vals: Sequence[float]) -> float:
    """Plain median (re-exported so scripts need one import)."""
    return statistics.median(vals)


# ---------------------------------------------------------------- markdown

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table. Floats: 3 decimals below 10 (ratios), 1 below 100, none above."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            if abs(v) >= 100:
                return f"{v:,.0f}"
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def section_header(name: str, title: str, command: str | None = None) -> str:
    """The standard top of a section: title, command, date, machine."""
    cmd = command if command is not None else command_line()
    return (f"## {title} (`{name}`)\n\n"
            f"- Command: `{cmd}`\n"
            f"- Date: {now_str()}\n"
            f"- Machine: {machine_info()}\n\n")


_BEGIN = "<!-- BEGIN {name} -->"
_END = "<!-- END {name} -->"


def write_section(doc: Path, name: str, markdown: str, intro: str = "") -> None:
    """Replace the `name` section of `doc` with `markdown`; other sections are left as they are.

    A section is the text between `<!-- BEGIN name -->` and `<!-- END name -->`. If the file does not
    exist it is created with `intro` (if given) on top; if the section does not exist it is appended.
    The file is written atomically (temp file + rename) so a crash never leaves it half-written.
    Writers are serialised with an fcntl lock on the doc's directory (no lock file is left behind), so
    two benchmarks finishing at once cannot drop each other's section.
    """
    doc = Path(doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(doc.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_section_locked(doc, name, markdown, intro)
    finally:
        os.close(fd)  # closing releases the lock


def _write_section_locked(doc: Path, name: str, markdown: str, intro: str) -> None:
    begin, end = _BEGIN.format(name=name), _END.format(name=name)
    block = f"{begin}\n{markdown.rstrip()}\n{end}\n"
    text = doc.read_text() if doc.exists() else (intro.rstrip() + "\n\n" if intro else "")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        if text and not text.endswith("\n\n"):
            text = text.rstrip("\n") + "\n\n"
        text += block
    fd, tmp = tempfile.mkstemp(dir=doc.parent, prefix=f".{doc.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, doc)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_section(doc: Path, name: str) -> str | None:
    """The current body of section `name` in `doc`, or None if absent."""
    doc = Path(doc)
    if not doc.exists():
        return None
    begin, end = _BEGIN.format(name=name), _END.format(name=name)
    m = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), doc.read_text(), re.DOTALL)
    return m.group(1) if m else None


def print_ratio(label: str, ratio: float) -> None:
    """Print the final line every bench script ends with: `<label> ratio: <x>`."""
    print(f"{label} ratio: {ratio:.3f}", flush=True)


# ---------------------------------------------------------------- a trained digits ensemble (cached)

@dataclass
class TrainedRun:
    """A small trained digits ensemble: plan, work dir (checkpoints with training state), bundle."""

    root: Path
    plan_dir: Path
    work_dir: Path
    bundle: Path  # with the learned router; `load_bundle(bundle).router("centroid")` gives the other one

    def expert_weights(self, shard: int = 0) -> Path:
        """The trained expert's inference weights (EMA, fp32 safetensors)."""
        return self.bundle / f"expert_{shard}" / "model.safetensors"

    def state_file(self, shard: int = 0) -> Path:
        """The trained expert's training state (model, EMA, AdamW moments, RNG; fp32 safetensors)."""
        from ddm_node.train import checkpoint as ckpt

        step_dir = ckpt.latest_checkpoint(self.work_dir, shard)
        if step_dir is None:
            raise RuntimeError(f"no checkpoint of shard {shard} under {self.work_dir}")
        return step_dir / ckpt.STATE / ckpt.STATE_FILE


def trained_digits(expert_steps: int = 300, router_steps: int = 200, experts: int = 4, size: str = "tiny",
                   cache_dir: Path | None = None, threads: int = 1) -> TrainedRun:
    """Train (or reuse from a cache in the temp dir) a K-expert digits ensemble with a learned router.

    The cache key is the config hash, so different settings never share a directory; a lock makes
    concurrent callers wait for one training instead of racing. About 10 s per 100 expert steps of
    the tiny model on one idle core.
    """
    from ddm_node.core.config import config_hash, load_config
    from ddm_node.core.identity import Identity
    from ddm_node.data.datasets import load_dataset
    from ddm_node.data.plan import Plan, make_plan
    from ddm_node.ensemble.bundle import sources_from_work_dirs, write_bundle
    from ddm_node.train.expert import train_shard
    from ddm_node.train.router_job import train_plan_router

    cfg = load_config(overrides={"partition.experts": experts, "model.size": size, "train.steps": expert_steps,
                                 "train.checkpoint_every": max(expert_steps, 1), "train.threads": threads,
                                 "router.steps": router_steps})
    root = Path(cache_dir or Path(tempfile.gettempdir()) / "ddm-bench-cache") / config_hash(cfg)[:16]
    run = TrainedRun(root, root / "plan", root / "work", root / "bundle")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (run.bundle / "model_index.json").exists():
            return run
        import torch

        torch.set_num_threads(threads)
        ds = load_dataset(cfg.data.dataset)
        plan = make_plan(cfg, ds)
        plan.save(run.plan_dir)
        plan = Plan.load(run.plan_dir)
        ident = Identity.generate()
        for k in range(experts):
            train_shard(plan, k, run.work_dir, identity=ident, dataset=ds)
        router = train_plan_router(plan, root / "router", identity=ident, dataset=ds) if router_steps > 0 else None
        if run.bundle.exists():  # a half-built leftover can only be a directory without an index
            import shutil

            shutil.rmtree(run.bundle)
        write_bundle(run.bundle, plan, sources_from_work_dirs([run.work_dir], range(experts)), router)
    return run
