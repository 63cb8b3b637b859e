import django.db.models.deletion
from django.db import migrations, models

# The trigger that keeps RunDurationTally exact (PostgreSQL only; elsewhere console.metrics counts the runs with
# the same CASE). A run counts once it has both a start and a finish time, in the bucket of its duration.
BOUNDS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600)  # operations.models.RUN_DURATION_BUCKETS without +Inf
BUCKET = ("CASE " + " ".join(f"WHEN EXTRACT(EPOCH FROM {{r}}.finished_at - {{r}}.started_at) <= {b} THEN {b}"
                             for b in BOUNDS) + " ELSE 'Infinity'::float8 END")
TIMED = "{r}.started_at IS NOT NULL AND {r}.finished_at IS NOT NULL"
FORWARD = f"""
CREATE FUNCTION operations_run_duration_tally() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') AND {TIMED.format(r="OLD")} THEN
    UPDATE operations_rundurationtally SET runs = runs - 1
     WHERE customer_id = OLD.customer_id AND kind = OLD.kind AND status = OLD.status
       AND le = {BUCKET.format(r="OLD")};
  END IF;
  IF TG_OP IN ('UPDATE', 'INSERT') AND {TIMED.format(r="NEW")} THEN
    INSERT INTO operations_rundurationtally (customer_id, kind, status, le, runs)
    VALUES (NEW.customer_id, NEW.kind, NEW.status, {BUCKET.format(r="NEW")}, 1)
    ON CONFLICT (customer_id, kind, status, le) DO UPDATE SET runs = operations_rundurationtally.runs + 1;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER operations_run_duration_tally_insert_delete AFTER INSERT OR DELETE ON operations_run
  FOR EACH ROW EXECUTE FUNCTION operations_run_duration_tally();
CREATE TRIGGER operations_run_duration_tally_update AFTER UPDATE ON operations_run FOR EACH ROW
  WHEN (OLD.customer_id IS DISTINCT FROM NEW.customer_id OR OLD.kind IS DISTINCT FROM NEW.kind
        OR OLD.status IS DISTINCT FROM NEW.status OR OLD.started_at IS DISTINCT FROM NEW.started_at
        OR OLD.finished_at IS DISTINCT FROM NEW.finished_at)
  EXECUTE FUNCTION operations_run_duration_tally();
INSERT INTO operations_rundurationtally (customer_id, kind, status, le, runs)
  SELECT customer_id, kind, status, {BUCKET.format(r="operations_run")}, count(*)
  FROM operations_run WHERE {TIMED.format(r="operations_run")} GROUP BY 1, 2, 3, 4;
"""
BACKWARD = """
DROP TRIGGER IF EXISTS operations_run_duration_tally_update ON operations_run;
DROP TRIGGER IF EXISTS operations_run_duration_tally_insert_delete ON operations_run;
DROP FUNCTION IF EXISTS operations_run_duration_tally();
"""


def _on_postgresql(sql_text):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql_text)
    return run


class Migration(migrations.Migration):

    dependencies = [
        ('customers', '0002_uuid_run_as_maintenance'),
        ('operations', '0006_fleet_slots'),
    ]

    operations = [
        migrations.CreateModel(
            name='RunDurationTally',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('kind', models.CharField(max_length=20)),
                ('status', models.CharField(max_length=12)),
                ('le', models.FloatField(help_text="The bucket's upper bound in seconds (inf: the last).")),
                ('runs', models.BigIntegerField(default=0)),
                ('customer', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='+',
                                               to='customers.customer')),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('customer', 'kind', 'status', 'le'),
                                                        name='one_duration_tally_per_bucket')],
            },
        ),
        migrations.RunPython(_on_postgresql(FORWARD), _on_postgresql(BACKWARD)),
    ]
