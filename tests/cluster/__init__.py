"""Plumbing of tests/test_cluster_faults.py: a 3-broker KRaft cluster and
Stepline workers in containers (cluster.py), and the checks it makes of the
log afterwards (checks.py)."""
