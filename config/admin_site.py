"""The admin site: Django's, with the open-incident dashboard on its index page."""

from django.contrib import admin
from django.utils import timezone


class TrackerAdminSite(admin.AdminSite):
    site_header = "Incident tracker"
    site_title = "Incident tracker"
    index_title = "Open incidents"
    index_template = "admin/tracker_index.html"

    def index(self, request, extra_context=None):
        from incidents.selectors import dashboard

        context = {"now": timezone.now()}
        if request.user.has_perm("incidents.view_incident"):
            context["dashboard"] = dashboard(now=context["now"])
        if request.user.has_perm("escalation.view_rotation"):
            from escalation.selectors import oncall_now_all_teams

            context["oncall_teams"] = oncall_now_all_teams(context["now"])
        context.update(extra_context or {})
        return super().index(request, extra_context=context)
