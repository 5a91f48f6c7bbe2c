"""Public (no login) pages; included from config/urls.py."""

urlpatterns: list = []
