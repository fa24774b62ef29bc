"""The soak in short, as CI runs it: scripts/soak.py end to end with one fault, rerun and checked.

The fault is of the one kind no other test injects end to end: the run's process group SIGKILLed once rows are
committed and the same command rerun at once, while the killed driver is still an unreaped zombie holding the lease
(0.2 refused that rerun with exit 4 for up to --lease-seconds). Each other kind has its own test, which kills as the
soak does: driver SIGKILLs mid-run and actor kills, S3 outages and a full disk in tests/test_faults.py, node removal
in tests/test_cluster.py. The full soak (52 faults of every kind, about an hour here) is `scripts/soak.py` with its
defaults; its last figures are in docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers_proxy import PausableProxy


@pytest.mark.slow
def test_a_short_soak_kills_reruns_at_once_and_loses_and_duplicates_nothing(tmp_path):
    record = tmp_path / "soak.json"
    soak = subprocess.run([sys.executable, "scripts/soak.py", "--faults", "1", "--kinds", "rerun", "--minutes", "10",
                           "--seed", "3", "--work", str(tmp_path / "work"), "--json", str(record)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    assert soak.returncode == 0, soak.stdout[-4000:] + soak.stderr[-3000:]
    trials = [t for t in json.loads(record.read_text())["trials"] if "skipped" not in t]
    assert [t["kind"] for t in trials] == ["rerun"] and trials[0]["first_status"] == -9, trials
    assert trials[0]["reruns"] == [0], trials  # the one rerun, beside the zombie, finished: not refused (exit 4)
    for trial in trials:
        assert trial["strict_clean"] and trial["same_rows_as_reference"], trial
        assert trial["duplicates"] == trial["missing_images"] == trial["orphan_images"] == 0, trial
        assert trial["temporary_files"] == trial["leftover_parts"] == 0, trial
        if trial["first_status"] not in (0, -9):  # a failed first run said so in one line
            assert trial["one_line"], trial
    assert "**soak PASSED**" in soak.stdout


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
