"""The soak's own machinery, checked without its runs: its fault plan and its verdict, and the pausable proxy
it cuts the store off with.

The soak (scripts/soak.py: 52 faults of seven kinds, about an hour here; its last figures in docs/reliability.md)
is run by hand. Every kind of fault it injects is also injected end to end by a test, killing real processes:
driver SIGKILLs mid-run, and a rerun at once beside the killed driver left a zombie holding the lease, in
tests/test_faults.py::test_driver_sigkill_then_rerun_matches_an_uninterrupted_run; actor kills, S3 outages and a
full disk in tests/test_faults.py; node removal in tests/test_cluster.py.
"""

from __future__ import annotations

import importlib.util
import random

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers_proxy import PausableProxy


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak", REPO_ROOT / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_soak_plans_every_asked_kind_and_fails_on_one_unclean_trial(soak):
    plan = soak.fault_plan(52, list(soak.KINDS), random.Random(0))
    assert len(plan) == 52 and set(plan) == set(soak.KINDS)
    assert plan == soak.fault_plan(52, list(soak.KINDS), random.Random(0))  # a seed replays the same soak
    assert soak.fault_plan(3, ["rerun"], random.Random(1)) == ["rerun"] * 3
    reference = {"rows": 32, "seconds": 12.0}
    clean = {"kind": "rerun", "detail": "SIGKILL at 5.0 s", "first_status": -9, "ok": True, "reruns": [0],
             "committed_at_fault": 8, "delivered_rows": 32, "same_rows_as_reference": True, "out": "o1"}
    assert "**soak PASSED**" in soak.report([clean], reference, 40.0)
    unclean = {**clean, "ok": False, "duplicates": 1, "out": "o2"}
    verdict = soak.report([clean, unclean], reference, 80.0)
    assert "**soak FAILED**: rerun (SIGKILL at 5.0 s) in o2" in verdict and "duplicates 1" in verdict
    assert "| rerun | 2 | -9: 2 | 1 |" in verdict


def test_the_paused_proxy_cuts_the_store_off_and_resuming_restores_it(s3_endpoint, s3_bucket):
    """The soak's S3 outage: through the proxy, reads work; paused, a request fails fast (reset, no retry here);
    resumed, the same request works again, and the store kept what it had."""
    import s3fs
    from botocore.exceptions import EndpointConnectionError

    port = int(s3_endpoint.rsplit(":", 1)[1])
    proxy = PausableProxy(port)
    try:
        no_retry = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 2}}
        key = f"{s3_bucket[len('s3://'):]}/proxy-check.txt"
        s3fs.S3FileSystem(endpoint_url=s3_endpoint).pipe(key, b"kept")
        through = s3fs.S3FileSystem(endpoint_url=proxy.url, skip_instance_cache=True, **no_retry)
        assert through.cat(key) == b"kept"
        proxy.pause()
        with pytest.raises((OSError, EndpointConnectionError)):
            s3fs.S3FileSystem(endpoint_url=proxy.url, skip_instance_cache=True, **no_retry).cat(key)
        proxy.resume()
        assert s3fs.S3FileSystem(endpoint_url=proxy.url, skip_instance_cache=True, **no_retry).cat(key) == b"kept"
    finally:
        proxy.close()
