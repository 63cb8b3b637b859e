"""`make run S3=1`: the demo's backups get a second, immutable copy on a local SeaweedFS (engines.seaweedfs).

The storage target "demo-s3" points at the server's Object Lock bucket with a governance lock of one day; the demo
customer's policy keeps the local target as its primary and gets demo-s3 as a replica, so 3-2-1 shows two copies,
one of them locked. A demo customer still on the global policy gets a policy of its own, a copy of the global one:
the global policy (every other customer's) stays as it was.
"""

from __future__ import annotations

from django.db import transaction

from backups.models import BackupPolicy, StorageTarget
from backups.services import global_policy
from customers.demo import DEMO_DOMAIN
from customers.models import Customer

TARGET = "demo-s3"
BUCKET = "kasa-demo"
LOCK_MODE = "governance"
LOCK_DAYS = 1


def demo_s3_target(*, endpoint: str, access_key: str, secret_key: str, bucket: str = BUCKET,
                   region: str = "us-east-1") -> tuple[StorageTarget, Customer | None]:
    """Create or update the target (the server's ports may change between runs) and make it a replica of the demo
    customer's policy. Returns the target and the demo customer (None when there is none: kasa_setup --no-demo)."""
    with transaction.atomic():
        target = StorageTarget.objects.filter(name=TARGET).first() or StorageTarget(name=TARGET)
        target.kind = StorageTarget.Kind.S3
        target.bucket, target.prefix, target.endpoint_url, target.region = bucket, "", endpoint, region
        target.access_key, target.secret_key = access_key, secret_key
        target.lock_mode, target.lock_days, target.enabled = LOCK_MODE, LOCK_DAYS, True
        target.full_clean(exclude=["teams"])
        target.save()
        customer = Customer.objects.filter(domain=DEMO_DOMAIN).first()
        if customer is None:
            return target, None
        policy = BackupPolicy.objects.filter(customer=customer).first()
        if policy is None:
            policy = _copy_of_global(customer)
        if policy.target_id != target.pk:
            policy.replicas.add(target)
    return target, customer


def _copy_of_global(customer: Customer) -> BackupPolicy:
    base = global_policy()
    skip = {"id", "customer"}
    values = {f.attname: getattr(base, f.attname) for f in BackupPolicy._meta.concrete_fields if f.name not in skip}
    policy = BackupPolicy.objects.create(customer=customer, **values)
    policy.replicas.set(base.replicas.all())
    return policy
