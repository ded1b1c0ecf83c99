"""Joining a run's swarm as a client (status, assemble) and getting its plan from any peer.

`join_swarm` starts a DHT peer (on 127.0.0.1 by default) under a throwaway identity unless one is given;
`fetch_plan` asks the peers that announce a `PlanRecord` for the plan bytes, which `NodeClient.get_plan`
checks against the run id (sha256), so any peer may serve it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import ddm_node.swarm  # noqa: F401  (first: picks hivemind's memory sharing strategy before hivemind loads)
from ddm_node.core.errors import DDMError
from ddm_node.core.identity import Identity
from ddm_node.data.plan import Plan
from ddm_node.exchange.fetch import describe
from ddm_node.swarm.dht import Swarm
from ddm_node.swarm.keys import check_run_id
from ddm_node.swarm.own_addresses import check_initial_peers
from ddm_node.transfer.client import NodeClient

log = logging.getLogger(__name__)

PLAN_POLL = 1.0  # seconds between plan look-ups while nobody serves it yet
PLAN_CALL_TIMEOUT = 10.0  # seconds for one GetPlan call
JOIN_RETRY, JOIN_RETRY_MAX = 2.0, 30.0  # seconds between joins that failed, doubling (join_swarm with a wait)


def join_swarm(initial_peers: Sequence[str], run_id: str, identity: Identity | None = None,
               host: str = "127.0.0.1", wait: float = 0.0) -> Swarm:
    """A DHT peer of run `run_id` joined through `initial_peers` (multiaddrs); the caller shuts it down.

    Without `identity` a throwaway key is generated: a reader writes no records, so its key only
    has to sign the validator's (unused) writes. With `wait` > 0, a join that fails (no initial peer
    answers: the bootstrap is restarting, or not up yet) is tried again until `wait` seconds pass.
    """
    if not initial_peers:
        raise DDMError("give at least one --initial-peers multiaddr of a running peer")
    check_initial_peers(initial_peers, "--initial-peers")
    check_run_id(run_id)  # bad input fails at once; only a join nobody answers is tried again
    deadline, pause = time.monotonic() + max(0.0, wait), JOIN_RETRY
    while True:
        try:
            return Swarm(identity or Identity.generate(), run_id, initial_peers=list(initial_peers), host=host,
                         client_mode=True)
        except DDMError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            log.warning("%s; trying again in %.0f s (--wait: %.0f s left)", exc, min(pause, left), left)
            time.sleep(min(pause, left))
            pause = min(2 * pause, JOIN_RETRY_MAX)


def fetch_plan(swarm: Swarm, run_id: str, timeout: float = 20.0, stop: threading.Event | None = None) -> Plan:
    """The plan of `run_id` from any peer that announces it, retried until `timeout` seconds pass (or `stop`).

    Every plan is checked against the run id (sha256 of its bytes) before it is parsed, so a peer
    cannot hand out another plan. Raises DDMError naming the run id (and why each peer failed)
    when nobody serves it in time.
    """
    deadline = time.monotonic() + max(0.0, timeout)
    stop = stop or threading.Event()
    reasons: dict[str, str] = {}
    while True:
        holders = list(dict.fromkeys(r.grpc for r in swarm.plan_holders(run_id)))
        for address in holders:
            remaining = deadline - time.monotonic()
            try:
                with NodeClient(address, timeout=min(PLAN_CALL_TIMEOUT, max(1.0, remaining))) as client:
                    raw = client.get_plan(run_id)
                plan = Plan.from_bytes(raw, f"plan of run {run_id[:16]} from {address}")
                log.info("plan of run %s from %s", run_id[:16], address)
                return plan
            except Exception as exc:  # one peer's boundary: whatever its plan bytes do, the next peer is asked
                reasons[address] = describe(exc)
                log.warning("plan from %s rejected: %s", address, reasons[address],
                            exc_info=None if isinstance(exc, DDMError) else exc)
        if time.monotonic() >= deadline or stop.wait(min(PLAN_POLL, max(0.0, deadline - time.monotonic()))):
            break
    if not reasons:
        raise DDMError(f"no peer announces the plan of run {run_id} (waited {timeout:.0f} s); "
                       f"is the run id right and are the initial peers part of its swarm?")
    tried = "; ".join(f"{a}: {r}" for a, r in reasons.items())
    raise DDMError(f"cannot get the plan of run {run_id} from any peer: {tried}")
