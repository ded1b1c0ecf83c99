"""`ddm-node distill`: train one dense student on an ensemble bundle's velocity (ensemble/distill.py)."""

from __future__ import annotations

from ddm_node.cli.flags import add_set_flag
from ddm_node.core.config import MODEL_SIZES, RouterChoice, Routing, choices


def cmd_distill(args) -> int:
    import signal
    import threading

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ddm_node.core.identity import Identity
    from ddm_node.ensemble.bundle import load_bundle
    from ddm_node.ensemble.distill import distill, student_config

    stop = threading.Event()

    def on_signal(*_) -> None:  # the first stops after the current step (checkpoint, bundle); a second at once
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        bundle = load_bundle(args.ensemble)  # every file verified
        plan = bundle.plan
        cfg = student_config(plan, args.steps, args.size, args.config, args.sets)
        sample = plan.cfg.sample
        for key in ("routing", "router", "top_k"):
            if getattr(args, key) is not None:
                setattr(sample, key, getattr(args, key))
        identity = Identity.load(args.identity) if args.identity else None
        console = Console(stderr=True)
        prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
        task = prog.add_task("student", total=args.steps, info="")

        def advance(step: int, loss: float) -> None:  # the bar appears with the first step, after every check
            prog.start()
            prog.update(task, completed=step, info=f"loss {loss:.4f}")

        out = distill(bundle, args.out, cfg, sample, identity=identity, device=args.device, should_stop=stop.is_set,
                      on_step=advance)
    finally:
        if "prog" in locals():
            prog.stop()
        for s, h in handlers.items():
            signal.signal(s, h)
    if stop.is_set():
        console.print("stopped on request; the newest checkpoint is in the bundle (run again to go on)")
    print(out)
    return 0


def add_distill_parser(sub, positive) -> None:
    p = sub.add_parser("distill", help="train one dense student on an ensemble bundle's velocity (resumable)")
    p.add_argument("--ensemble", required=True, help="the ensemble bundle (the teacher)")
    p.add_argument("--steps", required=True, type=positive("--steps"), help="student training steps in all")
    p.add_argument("--out", required=True, help="the student's bundle; its checkpoints are in OUT/train (resumed)")
    p.add_argument("--size", choices=sorted(MODEL_SIZES), help="the student's model size (default: the experts')")
    p.add_argument("--config", help="YAML whose keys change the plan's config for the student (train.lr, ...)")
    add_set_flag(p, "a key of the student's config (the plan's by default)")
    p.add_argument("--routing", choices=choices(Routing), help="the teacher's routing (default: the plan's sample)")
    p.add_argument("--router", choices=choices(RouterChoice), help="the teacher's router (default: the plan's)")
    p.add_argument("--top-k", dest="top_k", type=positive("--top-k"))
    p.add_argument("--identity", help="key file to sign the student's checkpoints with (ddm-node keygen)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the config's train.device)")
    p.set_defaults(func=cmd_distill)

