from django.contrib import admin
from django.urls import include, path

from console import views as console_views
from core import views

admin.site.site_header = "Kasa"
admin.site.site_title = "Kasa"
admin.site.index_title = "Customer instances"

urlpatterns = [
    path("health/live/", views.health_live, name="health-live"),
    path("health/ready/", views.health_ready, name="health-ready"),
    path("health/", views.health_detail, name="health"),
    path("metrics", console_views.metrics, name="metrics"),
    path("", include("backups.urls")),
    path("", admin.site.urls),
]
