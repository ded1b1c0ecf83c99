"""GPU check: our Trainer's step against a plain PyTorch DiT flow-matching loop, MFU, sampling throughput.

Runs on the lent GPU machine (Python 3.12, torch 2.11, no internet, no hivemind, maybe no pyyaml,
cryptography or safetensors): it imports only torch, ddm_node.core.config/model/train.trainer and
router.sampler, and reports which optional packages are missing.

Measured in ONE run, side by side (repetitions interleaved A B, B A, ... ; median of per-pair ratios):
- ours:  `ddm_node.train.trainer.Trainer` (bf16 autocast, torch.compile, fused AdamW, TF32, EMA, grad
         clipping, the seeded host-side data/noise stream, losses read back every 32 steps);
- plain: the loop anyone would write for the same DiT: data and noise drawn on the GPU, bf16 autocast,
         torch.compile, fused AdamW; no EMA, no clipping.
MFU = images/s x 3 x ddm_node.core.model.flops_per_image / peak (989 TFLOP/s dense bf16 on H100 SXM / H200).
Goal (docs/BENCHMARKS.md): ours >= 0.95 x plain, DiT-B/2 batch 256 MFU >= 0.40.

    python bench/gpu_check.py --out DIR             # on a GPU; writes DIR/gpu_check.md and .json
    python bench/gpu_check.py --device cpu --tiny   # the CPU path with a tiny model (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/gpu_check.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ddm_node.core.config import ModelConfig, TrainConfig  # noqa: E402
from ddm_node.core.model import DiT, count_params, flops_per_image  # noqa: E402
from ddm_node.train.trainer import Trainer  # noqa: E402

NAME = "bench.gpu_check"
OPTIONAL = ("yaml", "cryptography", "safetensors", "hivemind", "grpc", "numpy", "sklearn", "psutil", "pytest")
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12))
GOAL_RATIO, GOAL_MFU = 0.95, 0.40
REFERENCE = {"B/2": (256, 2501.0, 0.35), "XL/2": (128, 540.0, 0.39)}  # ENVIRONMENT.md: plain loop, compiled


@dataclass
class Result:
    """One model size: both sides' images/s per repetition and what follows from them."""

    size: str
    batch: int
    params: int
    ours: list[float] = field(default_factory=list)
    plain: list[float] = field(default_factory=list)
    ratio: float | None = None
    mfu_ours: float | None = None
    mfu_plain: float | None = None
    compile_s: dict = field(default_factory=dict)


def missing_modules() -> list[str]:
    return [m for m in OPTIONAL if importlib.util.find_spec(m) is None]


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16:
        if key in name:
            return peak, name
    return None, name


def model_cfg(size: str, tiny: bool) -> ModelConfig:
    if tiny:
        return ModelConfig(size="tiny", image_size=8, channels=4, num_classes=10, hidden=64, depth=2, heads=4)
    return ModelConfig(size=size, image_size=32, channels=4, num_classes=1000)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    """The Trainer on synthetic latents (unit-variance, as SD-VAE latents * 0.18215 are)."""

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device, compile_: bool, n: int):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
        y = torch.randint(0, cfg.num_classes, (n,), generator=g)
        train = TrainConfig(batch_size=batch, lr=1e-4, betas=(0.9, 0.999), ema_decay=0.9999, warmup_steps=0,
                            checkpoint_every=10**9, bf16=True, compile=compile_, device=str(device))
        self.device = device
        self.trainer = Trainer(cfg, train, x, y, device=str(device), check_range=False)

    def steps(self, k: int) -> float:
        """Run k steps, return images/s (the GPU is drained before and after)."""
        sync(self.device)
        t0 = time.perf_counter()
        self.trainer.run(self.trainer.step + k)
        sync(self.device)
        return k * self.trainer.train_cfg.batch_size / (time.perf_counter() - t0)


class Plain:
    """The plain loop: everything on the device, nothing but the step."""

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device, compile_: bool, n: int):
        torch.manual_seed(0)
        self.cfg, self.batch, self.device = cfg, batch, device
        self.model = DiT(cfg).to(device).train()
        cuda = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     fused=cuda)
        self.fwd = torch.compile(self.model) if compile_ and cuda else self.model
        self.x = torch.randn(n, cfg.channels, cfg.image_size, cfg.image_size, device=device)
        self.y = torch.randint(0, cfg.num_classes, (n,), device=device)
        self.cuda = cuda

    def step(self) -> None:
        b, null = self.batch, self.cfg.num_classes
        idx = torch.randint(self.x.shape[0], (b,), device=self.device)
        x0, y = self.x[idx], self.y[idx]
        y = torch.where(torch.rand(b, device=self.device) < self.cfg.class_dropout, torch.full_like(y, null), y)
        t = torch.rand(b, device=self.device)
        eps = torch.randn_like(x0)
        tb = t.view(-1, 1, 1, 1)
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext():
            v = self.fwd((1 - tb) * x0 + tb * eps, t, y)
        loss = F.mse_loss(v.float(), eps - x0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def steps(self, k: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(k):
            self.step()
        sync(self.device)
        return k * self.batch / (time.perf_counter() - t0)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bench_training(size: str, batch: int, device: torch.device, args, plain_side: bool = True) -> Result:
    cfg = model_cfg(size, args.tiny)
    compile_ = device.type == "cuda" and not args.no_compile
    n = 8 * batch
    ours = Ours(cfg, batch, device, compile_, n)
    res = Result(size=size if not args.tiny else "tiny", batch=batch, params=count_params(ours.trainer.model))
    res.compile_s["ours"] = timed(ours.steps, args.warmup)  # compilation and autotuning happen here
    plain = None
    if plain_side:
        plain = Plain(cfg, batch, device, compile_, n)
        res.compile_s["plain"] = timed(plain.steps, args.warmup)
    for i in range(args.reps):
        sides = [("ours", ours), ("plain", plain)] if i % 2 == 0 else [("plain", plain), ("ours", ours)]
        for name, side in sides:
            if side is not None:
                getattr(res, name).append(side.steps(args.steps))
    peak, _ = peak_flops(device)
    train_flops = 3 * flops_per_image(cfg)
    if res.plain:
        res.ratio = statistics.median(a / b for a, b in zip(res.ours, res.plain))
    if peak:
        res.mfu_ours = statistics.median(res.ours) * train_flops / peak
        res.mfu_plain = statistics.median(res.plain) * train_flops / peak if res.plain else None
    del ours, plain
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def bench_sampling(size: str, batch: int, steps: int, device: torch.device, args) -> dict:
    """Euler sampling (router.sampler) with a DiT in eval mode, bf16, compiled: images/s and forwards/s."""
    from router.sampler import sample

    cfg = model_cfg(size, args.tiny)
    model = DiT(cfg).to(device).eval().requires_grad_(False)
    cuda = device.type == "cuda"
    fwd = torch.compile(model) if cuda and not args.no_compile else model

    def velocity(x, t, y):
        if cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fwd(x, t, y)
        return fwd(x, t, y)

    g = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device, generator=g)
    compile_s = timed(lambda: (sample(velocity, noise, 2, "euler", y), sync(device)))
    rates = []
    for _ in range(args.reps):
        sync(device)
        t0 = time.perf_counter()
        out = sample(velocity, noise, steps, "euler", y)
        sync(device)
        rates.append(batch / (time.perf_counter() - t0))
    assert bool(torch.isfinite(out).all()), "sampling produced NaN/inf"
    rate = statistics.median(rates)
    return {"size": size if not args.tiny else "tiny", "batch": batch, "steps": steps, "images_per_s": rate,
            "forwards_per_s": rate * steps, "compile_s": compile_s}


def fmt(v, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def report(info: dict, results: list[Result], sampling: list[dict], notes: list[str]) -> str:
    lines = ["## GPU check (`bench.gpu_check`)", "",
             f"- Command: `{info['command']}`", f"- Date: {info['date']}",
             f"- Device: {info['device_name']} (peak bf16 assumed: {fmt(info['peak_tflops'], '.0f')} TFLOP/s), "
             f"torch {info['torch']}, Python {info['python']}, CUDA {info['cuda']}",
             f"- Missing optional packages: {', '.join(info['missing']) or 'none'}",
             f"- Goals: ours >= {GOAL_RATIO} x plain (same run), DiT-B/2 batch 256 MFU >= {GOAL_MFU}", "",
             "| model | batch | params | ours img/s | plain img/s | ours/plain | MFU ours | MFU plain "
             "| compile s (ours/plain) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.size} | {r.batch} | {r.params / 1e6:.1f}M | {fmt(statistics.median(r.ours), '.1f')} | "
                     f"{fmt(statistics.median(r.plain), '.1f') if r.plain else 'n/a'} | {fmt(r.ratio, '.3f')} | "
                     f"{fmt(r.mfu_ours, '.3f')} | {fmt(r.mfu_plain, '.3f')} | "
                     f"{fmt(r.compile_s.get('ours'), '.0f')}/{fmt(r.compile_s.get('plain'), '.0f')} |")
    if sampling:
        lines += ["", "| sampling | batch | Euler steps | images/s | forwards/s (images) | compile s |",
                  "|---|---|---|---|---|---|"]
        for s in sampling:
            lines.append(f"| {s['size']} | {s['batch']} | {s['steps']} | {s['images_per_s']:.1f} | "
                         f"{s['forwards_per_s']:.0f} | {s['compile_s']:.0f} |")
    lines += ["", "Reference (docs ENVIRONMENT.md, plain loop, compiled, H100): B/2 batch 256 2501 img/s (0.35 MFU); "
              "XL/2 batch 128 540 img/s (0.39); forward only B/2 8731 img/s, XL/2 1941 img/s."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model and batch: a quick check of the code path")
    p.add_argument("--out", default=None, help="directory for gpu_check.md / gpu_check.json (default: print only)")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip later parts when less time is left")
    p.add_argument("--steps", type=int, default=None, help="steps per timed window")
    p.add_argument("--reps", type=int, default=None, help="timed windows per side")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side (compilation happens here)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--doc", action="store_true", help="also write the section into docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.reps, args.warmup = args.steps or 3, args.reps or 2, args.warmup or 2
    else:
        args.steps, args.reps, args.warmup = args.steps or 20, args.reps or 4, args.warmup or 8
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    start = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU path is a code check; one thread avoids fighting other jobs
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (use --device cpu --tiny for the CPU path)", file=sys.stderr)
        return 2
    peak, device_name = peak_flops(device)
    missing = missing_modules()
    info = {"command": "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device_name": device_name,
            "peak_tflops": peak / 1e12 if peak else None, "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda, "missing": missing}
    print(f"gpu_check: {device_name}, torch {torch.__version__}, missing optional packages: {missing or 'none'}",
          flush=True)
    notes: list[str] = []
    results: list[Result] = []
    sampling: list[dict] = []

    def write(final: bool) -> str:
        """Write what is measured so far (a later part may be cut off by the caller's timeout)."""
        md = report(info, results, sampling, notes + ([] if final else ["(partial: the check was still running)"]))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_check.md").write_text(md)
            payload = {"info": info, "training": [asdict(r) for r in results], "sampling": sampling, "notes": notes}
            (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))
        return md

    plan = [("B/2", 256, True), ("XL/2", 128, False)] if not args.tiny else [("tiny", 16, True)]
    for size, batch, plain_side in plan:
        left = args.budget_s - (time.monotonic() - start)
        need = 150.0 if size == "XL/2" else 0.0  # XL/2 compiles for a minute or two
        if left < need:
            notes.append(f"{size} batch {batch} skipped: {left:.0f}s of the time budget left")
            continue
        res = bench_training(size, batch, device, args, plain_side=plain_side)
        results.append(res)
        print(f"{res.size} batch {batch}: ours {statistics.median(res.ours):.1f} img/s, plain "
              f"{statistics.median(res.plain) if res.plain else float('nan'):.1f} img/s, ratio {fmt(res.ratio)}, "
              f"MFU ours {fmt(res.mfu_ours)}", flush=True)
        write(final=False)
        if size in ("B/2", "tiny"):
            left = args.budget_s - (time.monotonic() - start)
            if left > (5.0 if args.tiny else 60.0):
                sampling.append(bench_sampling(size, batch, 32 if not args.tiny else 4, device, args))
                print(f"sampling {size}: {sampling[-1]['images_per_s']:.1f} images/s", flush=True)
                write(final=False)
            else:
                notes.append(f"sampling skipped: {left:.0f}s of the time budget left")
    b2 = next((r for r in results if r.size == "B/2"), None)
    if b2 is not None:
        ok_ratio = b2.ratio is not None and b2.ratio >= GOAL_RATIO
        ok_mfu = b2.mfu_ours is not None and b2.mfu_ours >= GOAL_MFU
        notes.append(f"B/2 ours/plain {fmt(b2.ratio, '.3f')}: {'meets' if ok_ratio else 'MISSES'} "
                     f"the {GOAL_RATIO} goal; MFU {fmt(b2.mfu_ours, '.3f')}: {'meets' if ok_mfu else 'MISSES'} the {GOAL_MFU} goal")
    notes.append(f"total wall time {time.monotonic() - start:.0f}s")
    md = write(final=True)
    print(md, flush=True)
    if args.doc:
        from bench.common import BENCHMARKS_MD, write_section

        write_section(BENCHMARKS_MD, NAME, md)
    finite = all(math.isfinite(v) for r in results for v in r.ours + r.plain)
    return 0 if results and finite else 1


if __name__ == "__main__":
    sys.exit(main())
