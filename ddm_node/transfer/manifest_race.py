"""Racing holders for a signed manifest: one at a time while they answer, all of them once they fall silent."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.core.manifest import (
    Manifest,
)
from ddm_node.transfer.budget import SLOW, Budget
from ddm_node.transfer.client import DEFAULT_TIMEOUT, NodeClient
from ddm_node.transfer.store import is_hex64

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ManifestAnswer:
    """A verified signed manifest and the holder that gave it."""

    manifest: Manifest
    raw: bytes
    signature: bytes
    holder: str


def race_manifest(holders: Iterable[str], manifest_id: str, trusted_keys: Iterable[str] | None = None,
                  timeout: float = DEFAULT_TIMEOUT,
                  budget: Budget | None = None) -> tuple[ManifestAnswer | None, list[tuple[str, DDMError]]]:
    """The signed manifest from the first holder that gives a verified one, asking one holder at a time
    while they answer, and every remaining one (up to `budget.race` at once) when the holders asked have
    been silent for `budget.connect` seconds. Holders still silent when another answered are remembered
    as slow. Returns (the answer or None, [(holder, error)] of the holders that failed, in that order).
    """
    if not is_hex64(manifest_id):
        raise DDMError(f"bad manifest id {manifest_id!r} (want 64 lowercase hex chars)")
    trusted = list(trusted_keys) if trusted_keys is not None else None
    budget = budget or Budget.default()
    pending = deque(SLOW.order(holders))
    answers: queue.Queue = queue.Queue()
    clients: list[NodeClient] = []
    lock = threading.Lock()
    done = threading.Event()
    running: dict[str, float] = {}  # holder -> when it was asked
    errors: list[tuple[str, DDMError]] = []

    def ask(holder: str) -> None:
        try:
            client = NodeClient(holder, timeout)
        except DDMError as exc:
            answers.put((holder, None, exc))
            return
        with lock:
            if done.is_set():
                client.close()
                return
            clients.append(client)
        try:
            manifest, raw, signature = client.get_manifest(manifest_id, trusted)
            answers.put((holder, ManifestAnswer(manifest, raw, signature, holder), None))
        except DDMError as exc:
            answers.put((holder, None, exc))
        except Exception as exc:  # whatever a peer's bytes make a parser raise: that peer's failure
            answers.put((holder, None, DDMError(f"{holder}: manifest {manifest_id[:16]}: {exc!r}")))

    def start(n: int) -> None:
        while n > 0 and pending:
            holder = pending.popleft()
            running[holder] = time.monotonic()
            threading.Thread(target=ask, args=(holder,), daemon=True, name=f"ddm-manifest-{holder}").start()
            n -= 1

    start(1)
    answer = None
    try:
        while running:
            now = time.monotonic()
            silent_until = max(running.values()) + budget.connect
            if now >= silent_until and pending:  # every holder asked has been silent: ask the others too
                log.info("manifest %s: no answer from %s for %.1f s; asking %d more", manifest_id[:16],
                         ", ".join(running), budget.connect, min(len(pending), budget.race - len(running)))
                start(budget.race - len(running))
                continue
            try:
                holder, got, exc = answers.get(timeout=max(0.0, silent_until - now) if pending else None)
            except queue.Empty:
                continue
            running.pop(holder, None)
            if got is not None:
                answer = got
                break
            errors.append((holder, exc))
            log.warning("manifest %s: %s", manifest_id[:16], exc)
            if not running:
                start(1)
    finally:
        with lock:
            done.set()
            stale = list(clients)
        for client in stale:
            client.close()  # cancels the calls still waiting
    if answer is not None:
        now = time.monotonic()
        for holder, asked in running.items():
            if now - asked >= budget.connect:
                SLOW.add(holder, f"no manifest within {budget.connect:g} s while {answer.holder} answered",
                         budget.remember)
    return answer, errors


def first_manifest(holders: list[str], manifest_id: str, trusted_keys: Iterable[str] | None = None,
                    timeout: float = DEFAULT_TIMEOUT,
                    budget: Budget | None = None) -> tuple[Manifest, bytes, bytes, str, list[str]]:
    """The manifest from the first holder that gives a verified one (`race_manifest`).

    Returns (manifest, raw, signature, holder that gave it, holders that sent a bad one).
    """
    answer, errors = race_manifest(holders, manifest_id, trusted_keys, timeout, budget)
    bad = [h for h, exc in errors if isinstance(exc, IntegrityError)]
    if answer is None:
        error = IntegrityError if bad else DDMError
        reasons = "; ".join(str(exc) for _, exc in errors) or "no holders given"
        raise error(f"no verified manifest {manifest_id}: {reasons}")
    return answer.manifest, answer.raw, answer.signature, answer.holder, bad
