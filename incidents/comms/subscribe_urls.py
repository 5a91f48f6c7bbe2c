"""Public (no login) pages; included from config/urls.py at /status/: subscribing to
customer notices, confirming (double opt-in) and the one-click unsubscribe link."""

from django.urls import path

from . import views_subscribe

app_name = "subscribe"
urlpatterns = [
    path("subscribe/", views_subscribe.subscribe, name="subscribe"),
    path("confirm/<str:token>/", views_subscribe.confirm, name="confirm"),
    path("unsubscribe/<str:token>/", views_subscribe.unsubscribe, name="unsubscribe"),
]
