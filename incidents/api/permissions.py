"""Who may do what through the API (docs/api.md, "Permissions").

- Reading: any authenticated user reads incidents, alerts and the configuration. The one
  exception is integrations (alert sources): staff, or users with
  `incidents.view_integration`.
- Declaring an incident: the `incidents.add_incident` permission.
- Changing an incident (PATCH and every action): the `incidents.change_incident`
  permission AND one of: the user is staff or a superuser; the incident has no team; the
  user is a member of the incident's team. So a responder outside a team reads its
  incidents but cannot change them.
- Changing a severity's targets: staff only.

A refusal is a 403 whose JSON body says why: `{"detail": "...", "code": "..."}`.
"""

from __future__ import annotations

from rest_framework.permissions import SAFE_METHODS, BasePermission

from ..models import Incident


def refusal(detail: str, code: str) -> dict[str, str]:
    return {"detail": detail, "code": code}


def is_staff(user) -> bool:
    return bool(user and user.is_authenticated and (user.is_staff or user.is_superuser))


def may_change_incident(user, incident: Incident) -> tuple[bool, dict[str, str] | None]:
    """(True, None), or (False, the refusal body) with the reason."""
    if not user.has_perm("incidents.change_incident"):
        return False, refusal(
            "Changing an incident needs the incidents.change_incident permission.",
            "missing_permission",
        )
    if is_staff(user) or incident.team_id is None:
        return True, None
    if incident.team.members.filter(pk=user.pk).exists():
        return True, None
    return False, refusal(
        f"{incident.reference} belongs to team {incident.team.slug}; only its members "
        "and staff may change it.",
        "not_team_member",
    )


class IncidentPermission(BasePermission):
    """Read: authenticated. Declare (POST on the list): `add_incident`. Change (PATCH, the
    actions): `change_incident` and team membership, unless staff or the incident has no
    team. Views mark read-only actions with `read_only_actions`."""

    message = refusal("You may not do this.", "permission_denied")

    def _reads(self, request, view) -> bool:
        return request.method in SAFE_METHODS or view.action in getattr(
            view, "read_only_actions", ()
        )

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        if self._reads(request, view):
            return True
        if view.action == "create":
            if user.has_perm("incidents.add_incident"):
                return True
            self.message = refusal(
                "Declaring an incident needs the incidents.add_incident permission.",
                "missing_permission",
            )
            return False
        if user.has_perm("incidents.change_incident"):
            return True
        self.message = refusal(
            "Changing an incident needs the incidents.change_incident permission.",
            "missing_permission",
        )
        return False

    def has_object_permission(self, request, view, obj: Incident) -> bool:
        if self._reads(request, view):
            return True
        allowed, why = may_change_incident(request.user, obj)
        if not allowed:
            self.message = why
        return allowed


class StaffWritesOnly(BasePermission):
    """Authenticated users read; only staff and superusers write."""

    message = refusal("Only staff may change this.", "staff_only")

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        return request.method in SAFE_METHODS or is_staff(user)


class CanViewIntegrations(BasePermission):
    """Integrations (alert sources and their settings): staff, or `view_integration`."""

    message = refusal(
        "Integrations are visible to staff and to users with incidents.view_integration.",
        "missing_permission",
    )

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        return is_staff(user) or user.has_perm("incidents.view_integration")
