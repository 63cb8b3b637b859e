from django.contrib import admin
from django.urls import path

from . import views

urlpatterns = [
    # <path:name> so that any name, a traversal included, reaches the view and its catalogue check (404).
    path("backups/<int:backup_id>/download/<path:name>", admin.site.admin_view(views.backup_download),
         name="backups-download"),
]
