"""The Slurm tier's fixtures live with the multi-node ones in tests/cluster_fixtures.py."""

from cluster_fixtures import slurm_cluster  # noqa: F401
