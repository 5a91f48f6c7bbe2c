"""/api/v1/ routes of the incidents app: alert webhooks and the REST resources."""

from django.urls import path

from . import webhooks

urlpatterns = [
    path(
        "integrations/alertmanager/",
        webhooks.AlertmanagerWebhook.as_view(),
        name="webhook-alertmanager-bearer",
    ),
    path(
        "integrations/generic/",
        webhooks.GenericWebhook.as_view(),
        name="webhook-generic-bearer",
    ),
    path(
        "integrations/heartbeat/",
        webhooks.HeartbeatView.as_view(),
        name="webhook-heartbeat-bearer",
    ),
    path(
        "integrations/<str:token>/alertmanager/",
        webhooks.AlertmanagerWebhook.as_view(),
        name="webhook-alertmanager",
    ),
    path(
        "integrations/<str:token>/generic/",
        webhooks.GenericWebhook.as_view(),
        name="webhook-generic",
    ),
    path(
        "integrations/<str:token>/heartbeat/",
        webhooks.HeartbeatView.as_view(),
        name="webhook-heartbeat",
    ),
    path("events/v2/enqueue", webhooks.EventsV2Enqueue.as_view(), name="events-v2-enqueue"),
]
