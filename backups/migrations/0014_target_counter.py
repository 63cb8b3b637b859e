import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('backups', '0013_object_lock'),
    ]

    operations = [
        migrations.CreateModel(
            name='TargetCounter',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('written_bytes', models.BigIntegerField(default=0)),
                ('read_bytes', models.BigIntegerField(default=0)),
                ('errors', models.BigIntegerField(default=0, help_text='Backups, restores, drills and checks a StoreError ended.')),
                ('check_ok', models.BooleanField(help_text="The last target check's result (None: never checked).", null=True)),
                ('checked_at', models.DateTimeField(blank=True, null=True)),
                ('target', models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, related_name='+', to='backups.storagetarget')),
            ],
        ),
    ]
