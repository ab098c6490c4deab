"""The phases of a training round, as the state machine the loop (:mod:`legion_swarm.train.loop`) runs.

One round of one member goes through these phases; each phase's handler does its work and names the next::

    LOCAL_WORK --> GROUP --> HAND_OVER --> SHARDED_STEP --> COMMIT --> REPORT --> LOCAL_WORK ... DONE
                     |                          |                        ^
                     +--> LOCAL_WORK            +--> FAILED -------------+
                          (re-synced)

- :attr:`Phase.LOCAL_WORK`: the mode's local steps on batches of the leased data shard (none right after a
  re-sync in a mode that joins idle). Next: ``GROUP``.
- :attr:`Phase.GROUP`: ask the round's leader for the group. Next: ``HAND_OVER`` with the group formed, or
  ``LOCAL_WORK`` when this member's state was not the swarm's and it re-synced instead (the local work was on
  an old state: it is done again). Gives up with a ``TrainingError`` after ``max_failed_rounds`` attempts.
- :attr:`Phase.HAND_OVER`: fetch the optimizer state of this member's new shard from its previous owners if
  the partition moved. Next: ``SHARDED_STEP``.
- :attr:`Phase.SHARDED_STEP`: the mode's round on the collectives. Next: ``COMMIT`` if the round committed
  some shard, else ``FAILED``.
- :attr:`Phase.COMMIT` and :attr:`Phase.FAILED`: take the round's outcome as this member's state (round
  number, chained state id, owners, donors; a member the round declared faulty re-syncs at its next
  ``GROUP``). ``FAILED`` also counts the failure and gives up with a ``TrainingError`` after
  ``max_failed_rounds`` in a row; ``COMMIT`` resets that count. Next: ``REPORT``.
- :attr:`Phase.REPORT`: publish the progress, evaluate when due. Next: ``LOCAL_WORK``, or ``DONE`` once the
  member has committed the rounds it was asked for.

Pure: the phases and their allowed transitions, and :func:`run_phases`, which drives handlers and refuses a
transition the machine does not have (a handler's bug, not the network's).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Mapping

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    """One phase of a training round (see the module docstring for what each does)."""

    LOCAL_WORK = "local work"
    GROUP = "group"
    HAND_OVER = "hand-over"
    SHARDED_STEP = "sharded step"
    COMMIT = "commit"
    FAILED = "failed"
    REPORT = "report"
    DONE = "done"


TRANSITIONS: Mapping[Phase, frozenset[Phase]] = {
    Phase.LOCAL_WORK: frozenset({Phase.GROUP}),
    Phase.GROUP: frozenset({Phase.HAND_OVER, Phase.LOCAL_WORK}),
    Phase.HAND_OVER: frozenset({Phase.SHARDED_STEP}),
    Phase.SHARDED_STEP: frozenset({Phase.COMMIT, Phase.FAILED}),
    Phase.COMMIT: frozenset({Phase.REPORT}),
    Phase.FAILED: frozenset({Phase.REPORT}),
    Phase.REPORT: frozenset({Phase.LOCAL_WORK, Phase.DONE}),
    Phase.DONE: frozenset(),
}
"""Phase -> the phases it may go to next."""

STARTS = frozenset({Phase.LOCAL_WORK, Phase.DONE})
"""Where a run may start: its first round's local work, or done at once (no rounds asked for)."""

PhaseHandler = Callable[[], Awaitable[Phase]]
"""Does one phase's work and returns the next phase."""


async def run_phases(
    handlers: Mapping[Phase, PhaseHandler], start: Phase, *, on_enter: Callable[[Phase], None] | None = None
) -> None:
    """Run the phases from ``start`` until :attr:`Phase.DONE`: each handler names the next phase, which must be
    one :data:`TRANSITIONS` allows. ``on_enter`` sees every phase entered (``DONE`` included), e.g. for tests."""
    if start not in STARTS:
        raise ValueError(f"a run cannot start at {start.value!r}")
    phase = start
    while True:
        if on_enter is not None:
            on_enter(phase)
        if phase is Phase.DONE:
            return
        nxt = await handlers[phase]()
        if nxt not in TRANSITIONS[phase]:
            raise RuntimeError(f"phase {phase.value!r} cannot go to {nxt!r}")
        logger.debug("%s -> %s", phase.value, nxt.value)
        phase = nxt
