"""/api/v1/: the REST API. Each app contributes its routes."""

from django.urls import include, path

urlpatterns = [
    path("", include("incidents.api.urls")),
    path("", include("escalation.api.urls")),
]
