from django.urls import path

from . import views

app_name = "escalation"
urlpatterns = [
    path("ack/<str:token>/", views.page_ack, name="page-ack"),
]
