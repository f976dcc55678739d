from __future__ import annotations

from django.urls import path  # type: ignore[import-not-found]

from sandbox.apps.django_site import views

urlpatterns = [
    path("work", views.work, name="work"),
    path("awork", views.awork, name="awork"),
    path("healthz", views.healthz, name="healthz"),
]
