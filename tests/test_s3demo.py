"""`make run S3=1`'s setup (console.s3demo, engines.seaweedfs) against the session's SeaweedFS: a locked bucket,
the storage target demo-s3 with a governance lock, a replica of the demo customer's own policy."""

from __future__ import annotations

import uuid

import pytest

from engines import seaweedfs
from tests.s3 import ACCESS_KEY, SECRET_KEY


@pytest.fixture
def demo_customer(make_customer):
    from customers.demo import DEMO_DOMAIN

    return make_customer(DEMO_DOMAIN)


def test_demo_s3_setup_makes_a_locked_target_that_is_a_replica_of_the_demo_customer_only(seaweed, demo_customer):
    from backups.models import BackupPolicy
    from backups.services import global_policy, policy_for
    from console.s3demo import demo_s3_target

    bucket = f"kasa-demo-{uuid.uuid4().hex[:8]}"
    s3 = seaweedfs.client(seaweed.endpoint, ACCESS_KEY, SECRET_KEY)
    assert seaweedfs.ensure_locked_bucket(s3, bucket) is True
    assert seaweedfs.ensure_locked_bucket(s3, bucket) is False  # a second run finds it
    glob = global_policy()
    glob.keep_last = 9
    glob.save()

    target, customer = demo_s3_target(endpoint=seaweed.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                                      bucket=bucket)
    assert customer == demo_customer
    assert (target.kind, target.lock_mode, target.lock_days, target.bucket) == ("s3", "governance", 1, bucket)
    target.store().check()  # raises on a bucket without Object Lock and versioning
    policy = policy_for(demo_customer)
    assert policy.customer == demo_customer and policy.keep_last == 9  # a copy of the global policy
    assert policy.target.name == "local" and [t.name for t in policy.replicas.all()] == ["demo-s3"]
    assert not global_policy().replicas.exists()  # every other customer's policy is untouched

    # The next run's server may listen elsewhere: the same target is updated, the policy not duplicated.
    again, _ = demo_s3_target(endpoint="http://127.0.0.1:1", access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                              bucket=bucket)
    assert again.pk == target.pk and again.endpoint_url == "http://127.0.0.1:1"
    assert BackupPolicy.objects.filter(customer=demo_customer).count() == 1
    assert policy_for(demo_customer).replicas.count() == 1


def test_a_bucket_made_without_object_lock_is_refused_by_the_demo_setup(s3_server):
    s3 = s3_server.client()
    with pytest.raises(RuntimeError, match="without Object Lock"):
        seaweedfs.ensure_locked_bucket(s3, s3_server.bucket)


def test_prepare_keeps_the_secret_in_a_private_file_and_reuses_it(tmp_path):
    folder = tmp_path / "seaweedfs"
    first = seaweedfs.prepare(folder, weed="/bin/true")
    second = seaweedfs.prepare(folder, weed="/bin/true")
    secret = first.secret_key()
    assert len(secret) >= 30 and second.secret_key() == secret
    assert (folder / "identities.json").stat().st_mode & 0o777 == 0o600 and folder.stat().st_mode & 0o777 == 0o700
    assert not any(secret in a for a in first.argv)
    assert second.endpoint == first.endpoint  # the previous ports again while they are free
