from django.urls import path

from . import views

urlpatterns = [
    path("oncall/", views.OncallView.as_view(), name="oncall"),
    path(
        "rotations/<int:pk>/calendar.ics",
        views.RotationCalendarView.as_view(),
        name="rotation-calendar",
    ),
]
