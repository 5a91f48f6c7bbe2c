"""Public (no login) pages; included from config/urls.py."""

from django.urls import path

from . import views_status

urlpatterns = [
    path("", views_status.status_page_view, name="status-page"),
    path("feed.atom", views_status.status_feed_view, name="status-feed"),
]
