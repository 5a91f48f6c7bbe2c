from django.contrib.admin.apps import AdminConfig


class TrackerAdminConfig(AdminConfig):
    """The admin with the incident dashboard as its index page."""

    default_site = "config.admin_site.TrackerAdminSite"
