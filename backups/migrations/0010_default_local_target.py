"""The default `local` storage target exists right after `migrate` (issue 12): `backup_import --target local`
works on a fresh install before kasa_setup has run. kasa_setup (backups.services.default_target) finds it and
creates nothing; a target already named `local` is left as the operator set it."""

from django.conf import settings
from django.db import migrations

DEFAULT_TARGET = "local"  # backups.services.DEFAULT_TARGET, frozen here as migrations must be


def create_local_target(apps, schema_editor):
    StorageTarget = apps.get_model("backups", "StorageTarget")
    StorageTarget.objects.using(schema_editor.connection.alias).get_or_create(
        name=DEFAULT_TARGET, defaults={"kind": "local", "path": str(settings.KASA_BACKUP_DIR)})


class Migration(migrations.Migration):

    dependencies = [
        ("backups", "0009_storage_tally"),
    ]

    operations = [
        # Reversing keeps the target: it may hold backups by then.
        migrations.RunPython(create_local_target, migrations.RunPython.noop),
    ]
