"""Tools to try elasticity on one machine and to test training functions against faults."""

from ray_elastic.testing.cluster import LocalCluster, local_cluster
from ray_elastic.testing.faults import FaultInjector, InjectedFault, SlowToSave, fail_at, request_fault

__all__ = ["FaultInjector", "InjectedFault", "LocalCluster", "SlowToSave", "fail_at", "local_cluster", "request_fault"]
