import django.db.models.deletion
from django.db import migrations, models

import hosts.models


def to_local(apps, schema_editor):
    """Every customer registered before hosts existed lives on the worker's own machine."""
    Host = apps.get_model("hosts", "Host")
    local, _ = Host.objects.get_or_create(name="local", defaults={"address": "", "ssh_user": ""})
    apps.get_model("customers", "Customer").objects.filter(host__isnull=True).update(host=local)


class Migration(migrations.Migration):

    dependencies = [
        ('customers', '0004_tags_and_version_pin'),
        ('hosts', '0001_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='customer',
            name='host',
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.PROTECT, related_name='customers', to='hosts.host'),
        ),
        migrations.RunPython(to_local, migrations.RunPython.noop),
        migrations.AlterField(
            model_name='customer',
            name='host',
            field=models.ForeignKey(default=hosts.models.local_host_pk, help_text='The machine the customer lives on. Operations run on `local` (the worker\'s own machine) only, for now.', on_delete=django.db.models.deletion.PROTECT, related_name='customers', to='hosts.host'),
        ),
    ]
