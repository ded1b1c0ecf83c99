"""Is a shard (or the router job) done on a peer's word? Only when a verified, loadable artifact backs the word.

A checkpoint record that says `final` makes every other island skip the shard, so it is a claim about work, and
one peer's lie would cost the run a shard. It counts only when, asked of the addresses that announce it:
- both signed manifests (expert and training state) are this run's and shard's, at a step of at least the plan's
  step count, with the run's config hash, one publisher, and exactly the files the plan allows for their kind,
  none empty and none larger than the plan's model can fill (`ArtifactRules.size_problem`);
- the expert's bytes verify against its manifest and it loads as a bundle would load it: its config.json is the
  plan's model config and its weights fit that model (`fetch.download(..., content="load")`).
This is the cheapest check that proves what downstream uses of a final checkpoint need: the bundle takes the
expert alone, so only the expert is downloaded (once per announced final checkpoint per process, into a scratch
directory that is deleted after), and the state, which nobody resumes from once the shard is done, is held to its
signed manifest. A learned router record counts the same way: its artifact is downloaded and loaded.

Verdicts are cached per manifests: a final checkpoint that does not hold is not asked about again in this process;
one whose holders were unreachable (or this disk full) is asked again after `RETRY` seconds.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ddm_node.core.errors import DDMError, IntegrityError
from ddm_node.exchange.fetch import Expected, NoSpace, check_announced, describe, download
from ddm_node.swarm.records import CheckpointRecord, ReplicaRecord, RouterRecord
from ddm_node.train import checkpoint as ckpt
from ddm_node.train.limits import ArtifactRules
from ddm_node.transfer.client import PeerError

log = logging.getLogger(__name__)
RETRY = 30.0  # seconds before asking unreachable holders about the same artifact again


class DoneCheck:
    """Done checks over peers' records (see the module docstring); verdicts cached. Thread-compatible (one caller)."""

    def __init__(self, rules: ArtifactRules, trusted: list[str] | None, scratch: Path):
        self.rules, self.trusted, self.scratch = rules, trusted, Path(scratch)
        self._verdicts: dict[tuple[str, ...], tuple[bool, float | None]] = {}

    def shard(self, shard: int, records: Iterable[CheckpointRecord], replicas: Iterable[ReplicaRecord] = ()) -> bool:
        """Does some record announce a final checkpoint of `shard` (its own, or a mirror's copy of another's) that
        a verified, loadable expert backs?"""
        holders: dict[tuple[str, str, int], list[str]] = {}
        for r in records:
            if r.final and r.step >= self.rules.steps:
                holders.setdefault((r.expert_manifest, r.state_manifest, r.step), []).append(r.grpc)
        for c in replicas:  # a copy of another's checkpoint: after a whole-swarm restart its trainer may be down
            if c.step >= self.rules.steps and c.publisher_of_checkpoint != c.holder_key:
                holders.setdefault((c.expert_manifest, c.state_manifest, c.step), []).append(c.grpc)
        for (expert_id, state_id, step), grpc in sorted(holders.items(), key=lambda kv: -len(kv[1])):
            if self._verdict(("expert", expert_id, state_id, str(step)), f"expert {expert_id[:12]} (shard {shard} step "
                             f"{step}, final)", lambda: self._final(shard, step, expert_id, state_id, grpc)):
                return True
        return False

    def router(self, records: Iterable[RouterRecord]) -> bool:
        """Does some record announce a learned router of this run that verifies and loads?"""
        for r in records:
            if self._verdict(("router", r.manifest, str(r.step)), f"router {r.manifest[:12]} (step {r.step})",
                             lambda r=r: self._loads(r.manifest, [r.grpc], Expected("router", self.rules, -1, r.step))):
                return True
        return False

    def announced(self, manifest_id: str, holder: str, expected: Expected) -> bool:
        """Does `holder` serve a signed manifest that is what its record says (nothing downloaded)? The hand-off's
        check that a peer announcing a copy of our checkpoint holds it."""
        return self._verdict(("announced", manifest_id, holder, str(expected.step)),
                             f"{expected.kind} {manifest_id[:12]} at {holder}",
                             lambda: check_announced([holder], manifest_id, expected, self.trusted))

    def _final(self, shard: int, step: int, expert_id: str, state_id: str, holders: list[str]) -> None:
        rules = self.rules
        state = check_announced(holders, state_id, Expected(ckpt.STATE, rules, shard, step, rules.config_hash),
                                self.trusted)
        expected = Expected(ckpt.EXPERT, rules, shard, step, rules.config_hash)
        expert = check_announced(holders, expert_id, expected, self.trusted)
        if expert.publisher != state.publisher:
            raise IntegrityError(f"its expert is {expert.publisher[:12]}'s and its state {state.publisher[:12]}'s")
        self._loads(expert_id, holders, expected)

    def _loads(self, manifest_id: str, holders: list[str], expected: Expected) -> None:
        """Download an artifact into a scratch directory, verify and load it, delete it."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".done-check-", dir=self.scratch))
        try:
            download(holders, manifest_id, tmp / expected.kind, expected, self.trusted, content="load")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _verdict(self, key: tuple[str, ...], what: str, check: Callable[[], None]) -> bool:
        verdict = self._verdicts.get(key)
        if verdict is not None and (verdict[1] is None or time.monotonic() < verdict[1]):
            return verdict[0]
        try:
            check()
            why, verdict = "", (True, None)
        except (PeerError, NoSpace) as exc:  # unreachable, gone, or our disk: not a lie, ask again later
            why, verdict = str(exc), (False, time.monotonic() + RETRY)
        except DDMError as exc:  # bad signature, untrusted, malformed, not what was announced, does not load
            why, verdict = str(exc), (False, None)
        except Exception as exc:  # the done check's boundary: one peer's record never stops the island
            why, verdict = describe(exc), (False, time.monotonic() + RETRY)
            log.debug("done check of %s", what, exc_info=exc)
        if not verdict[0]:
            log.warning("not counting %s as done: %s", what, why)
        self._verdicts[key] = verdict
        return verdict[0]
