from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from console import views as console_views
from core import views

admin.site.site_header = "Kasa"
admin.site.site_title = "Kasa"
admin.site.index_title = "Customer instances"
# The app list sits on the index and the breadcrumbs lead there: a 275 px sidebar on every page would leave a
# changelist with its filters too little room for its columns on a 1366 px screen (issue 12, point 8).
admin.site.enable_nav_sidebar = False


class FaviconView(RedirectView):
    """/favicon.ico, which browsers ask for without reading a page: Kasa's icon (the admin pages link it)."""

    def get_redirect_url(self, *args, **kwargs):
        return static("kasa/favicon.svg")


urlpatterns = [
    path("favicon.ico", FaviconView.as_view(), name="favicon"),
    path("health/live/", views.health_live, name="health-live"),
    path("health/ready/", views.health_ready, name="health-ready"),
    path("health/", views.health_detail, name="health"),
    path("metrics", console_views.metrics, name="metrics"),
    path("", include("backups.urls")),
    path("", admin.site.urls),
]
