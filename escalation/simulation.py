"""What would happen if nobody acknowledged: who is paged when, and by which method.

Reads the current configuration (the severity's policy, rotations, overrides, contact
methods) and pages nobody. Used by `manage.py simulate_escalation` and the policy admin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from .models import EscalationPolicy
from .planning import policy_snapshot, schedule
from .services import _methods, resolve_targets


@dataclass(frozen=True)
class SimulatedPage:
    at: datetime
    offset: timedelta
    step: int  # 1-based
    round: int  # 1-based
    condition: str
    person: str
    method: str
    address: str
    backup: bool

    def as_json(self) -> dict:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        data["offset_seconds"] = int(self.offset.total_seconds())
        del data["offset"]
        return data


def simulate(
    policy: EscalationPolicy | None, *, start: datetime, horizon: timedelta | None = None
) -> list[SimulatedPage]:
    """Every page the policy would send from `start` if nobody acknowledged, in time order,
    including each person's backup methods after their `backup_after`. Stops at `horizon`."""
    plan = policy_snapshot(policy)
    end = start + horizon if horizon is not None else None
    pages: list[SimulatedPage] = []
    for step_index, round_, due in schedule(plan, start):
        if end is not None and due > end:
            break
        step = plan["steps"][step_index]
        for person in resolve_targets(step, at=due):
            methods = _methods(person)
            for position, method in enumerate(methods):
                at = due + position * person.backup_after
                if end is not None and at > end:
                    break
                pages.append(
                    SimulatedPage(
                        at=at,
                        offset=at - start,
                        step=step_index + 1,
                        round=round_ + 1,
                        condition=step["condition"],
                        person=person.name,
                        method=method.get_kind_display(),
                        address=method.address,
                        backup=position > 0,
                    )
                )
            if not methods:
                pages.append(
                    SimulatedPage(
                        at=due,
                        offset=due - start,
                        step=step_index + 1,
                        round=round_ + 1,
                        condition=step["condition"],
                        person=person.name,
                        method="(none)",
                        address="no contact method: this page would fail",
                        backup=False,
                    )
                )
    return sorted(pages, key=lambda p: (p.at, p.step, p.person))
