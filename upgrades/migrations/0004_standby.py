from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('upgrades', '0003_strategy'),
    ]

    operations = [
        migrations.AddField(
            model_name='upgrade',
            name='standby',
            field=models.JSONField(blank=True, default=dict, help_text='The previous release kept running after a blue-green switch.'),
        ),
        migrations.AddField(
            model_name='upgrade',
            name='standby_until',
            field=models.DateTimeField(blank=True, db_index=True, help_text='Set while the standby runs: its grace period ends then.', null=True),
        ),
        migrations.AddField(
            model_name='upgrade',
            name='switch_back',
            field=models.BooleanField(default=False, help_text="A rollback that only switched back to the standby's release folders (the databases untouched)."),
        ),
    ]
