"""/api/v1/ routes of the escalation app: who is on call, rotation calendars, and the
read-only teams, rotations and escalation policies (listed in the API root by
`incidents.api.urls`)."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter(use_regex_path=True)
router.register("teams", views.TeamViewSet, basename="team")
router.register("rotations", views.RotationViewSet, basename="rotation")
router.register("escalation-policies", views.EscalationPolicyViewSet, basename="escalation-policy")

urlpatterns = [
    path("oncall/", views.OncallView.as_view(), name="oncall"),
    path(
        "rotations/<int:pk>/calendar.ics",
        views.RotationCalendarView.as_view(),
        name="rotation-calendar",
    ),
    *router.urls,
]
