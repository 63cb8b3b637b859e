"""Extra config paths of a backup policy (issue 15, point 6): globs relative to the customer's root whose regular
files go into the config artifact with the .env files."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("backups", "0011_differential_backups"),
    ]

    operations = [
        migrations.AddField(
            model_name="backuppolicy",
            name="config_paths",
            field=models.JSONField(
                blank=True, default=list, verbose_name="extra config paths",
                help_text="More of the instance's configuration, in the config artifact with the .env files: globs "
                          "relative to the customer's root, e.g. [\"station_info.json\", \"nginx/*.conf\"]. Regular "
                          "files only (a symlink, or a file behind a symlinked folder, is never taken); restored like "
                          "the .env files."),
        ),
    ]
