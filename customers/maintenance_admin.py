"""Maintenance connections: an administrative login per database server, superusers only.

Kasa uses one (when it matches a customer database's engine, host and port) to create, rename and drop
databases during restores and rollbacks; without one it restores with the customer's own role alone
(backups.dbswap says how). The password is write-only, like every secret: never shown, empty keeps it.
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Q

from audit.admin_mixins import AuditedAdminMixin
from core.admin_mixins import SuperuserOnlyMixin
from engines import dburl

from .models import DatabaseConnection, MaintenanceConnection


@admin.register(MaintenanceConnection)
class MaintenanceConnectionAdmin(SuperuserOnlyMixin, AuditedAdminMixin, admin.ModelAdmin):
    # A login that can create and drop any database of a server serves every team on it: superusers only.
    list_display = ("__str__", "engine", "host", "port", "user", "database", "databases_served")
    list_filter = ("engine",)
    search_fields = ("host", "user")
    fields = ("engine", ("host", "port"), ("user", "password"), "database", "created_at")
    readonly_fields = ("created_at",)


    @admin.display(description="customer databases on this server")
    def databases_served(self, obj):
        port = Q(port=obj.port)
        if obj.port == dburl.DEFAULT_PORTS.get(obj.engine):
            port |= Q(port__isnull=True)  # a connection without a port uses the engine's default
        return DatabaseConnection.objects.filter(port, engine=obj.engine, host=obj.host).count()
