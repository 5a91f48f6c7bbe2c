"""/api/v1/ routes of the incidents app: alert webhooks, the REST resources, and the API
root, which lists the resources of every app (docs/api.md)."""

from django.urls import path
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework.routers import DefaultRouter

from escalation.api.urls import router as escalation_router

from . import notices, views, webhooks


class ApiRouter(DefaultRouter):
    """The default router, whose root also lists the escalation app's resources and the
    on-call endpoint, so `/api/v1/` shows the whole API."""

    include_format_suffixes = False
    extra_root_entries = {"oncall": "oncall"}

    def get_api_root_view(self, api_urls=None):
        list_name = self.routes[0].name
        entries = {
            prefix: list_name.format(basename=basename)
            for prefix, _viewset, basename in [*self.registry, *escalation_router.registry]
        }
        entries.update(self.extra_root_entries)
        return self.APIRootView.as_view(api_root_dict=dict(sorted(entries.items())))


router = ApiRouter()
router.register("incidents", views.IncidentViewSet, basename="incident")
router.register("alerts", views.AlertViewSet, basename="alert")
router.register("severities", views.SeverityViewSet, basename="severity")
router.register("services", views.ServiceViewSet, basename="service")
router.register("runbooks", views.RunbookViewSet, basename="runbook")
router.register("alert-routes", views.AlertRouteViewSet, basename="alert-route")
router.register("integrations", views.IntegrationViewSet, basename="integration")
router.register("notices", notices.NoticeViewSet, basename="notice")


WEBHOOK_TAGS = ["alert webhooks"]


def _webhook(view):
    """A webhook view as it is, filed under its own tag in the schema."""
    subclass = type(view.__name__, (view,), {"__doc__": view.__doc__})
    return extend_schema(tags=WEBHOOK_TAGS)(subclass)


def _bearer_variant(view, **operation_ids: str):
    """The same webhook, reached with the token in `Authorization: Bearer` rather than in
    the path: in the schema, its own operation ids (one per method) and no `token` path
    parameter. The view's behaviour is unchanged."""
    subclass = type(f"{view.__name__}Bearer", (view,), {"__doc__": view.__doc__})
    no_token = OpenApiParameter("token", OpenApiTypes.STR, OpenApiParameter.PATH, exclude=True)
    return extend_schema_view(
        **{
            method: extend_schema(
                operation_id=operation_id, parameters=[no_token], tags=WEBHOOK_TAGS
            )
            for method, operation_id in operation_ids.items()
        }
    )(subclass)


urlpatterns = [
    path(
        "integrations/alertmanager/",
        _bearer_variant(
            webhooks.AlertmanagerWebhook, post="v1_integrations_alertmanager_bearer_create"
        ).as_view(),
        name="webhook-alertmanager-bearer",
    ),
    path(
        "integrations/generic/",
        _bearer_variant(
            webhooks.GenericWebhook, post="v1_integrations_generic_bearer_create"
        ).as_view(),
        name="webhook-generic-bearer",
    ),
    path(
        "integrations/heartbeat/",
        _bearer_variant(
            webhooks.HeartbeatView,
            get="v1_integrations_heartbeat_bearer_retrieve",
            post="v1_integrations_heartbeat_bearer_create",
        ).as_view(),
        name="webhook-heartbeat-bearer",
    ),
    path(
        "integrations/<str:token>/alertmanager/",
        _webhook(webhooks.AlertmanagerWebhook).as_view(),
        name="webhook-alertmanager",
    ),
    path(
        "integrations/<str:token>/generic/",
        _webhook(webhooks.GenericWebhook).as_view(),
        name="webhook-generic",
    ),
    path(
        "integrations/<str:token>/heartbeat/",
        _webhook(webhooks.HeartbeatView).as_view(),
        name="webhook-heartbeat",
    ),
    path(
        "events/v2/enqueue",
        _webhook(webhooks.EventsV2Enqueue).as_view(),
        name="events-v2-enqueue",
    ),
    *router.urls,
]
