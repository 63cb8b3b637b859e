import uuid

import django.db.models.deletion  # noqa: F401
from django.db import migrations, models

import core.secrets


def fill_uuids(apps, schema_editor):
    Customer = apps.get_model("customers", "Customer")
    for pk in Customer.objects.values_list("pk", flat=True):
        Customer.objects.filter(pk=pk).update(uuid=uuid.uuid4())


class Migration(migrations.Migration):

    dependencies = [
        ("customers", "0001_initial"),
    ]

    operations = [
        # Added without the unique index, filled one row at a time, then made unique (a callable default
        # would give every existing row the same value).
        migrations.AddField(
            model_name="customer",
            name="uuid",
            field=models.UUIDField(editable=False, null=True, verbose_name="UUID"),
        ),
        migrations.RunPython(fill_uuids, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="customer",
            name="uuid",
            field=models.UUIDField(default=uuid.uuid4, editable=False, unique=True, verbose_name="UUID"),
        ),
        migrations.AddField(
            model_name="customer",
            name="run_as",
            field=models.CharField(
                blank=True, max_length=32, verbose_name="run as",
                help_text="OS user the customer's code runs as (PM2, start/stop commands, release hooks): not "
                          "root, not Kasa's own user. Empty: development only, Kasa's user with a warning on "
                          "every run.",
            ),
        ),
        migrations.AlterModelOptions(
            name="customer",
            options={
                "ordering": ["domain"],
                "permissions": [
                    ("change_runtime",
                     "Can change what runs: root folder, run as, process manager, commands, health URLs"),
                    ("check_customer", "Can check a customer's databases and services"),
                ],
            },
        ),
        migrations.CreateModel(
            name="MaintenanceConnection",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("engine", models.CharField(choices=[("postgresql", "PostgreSQL"), ("mysql", "MySQL / MariaDB")],
                                            max_length=12)),
                ("host", models.CharField(max_length=255)),
                ("port", models.PositiveIntegerField()),
                ("user", models.CharField(max_length=255)),
                ("password", core.secrets.EncryptedSecretField()),
                ("database", models.CharField(
                    blank=True, max_length=255, verbose_name="maintenance database",
                    help_text="Database to connect to (PostgreSQL: postgres); empty: the engine's default.")),
                ("created_at", models.DateTimeField(auto_now_add=True)),
            ],
            options={
                "ordering": ["engine", "host", "port"],
                "constraints": [models.UniqueConstraint(fields=("engine", "host", "port"),
                                                        name="unique_maintenance_server")],
            },
        ),
    ]
