"""The soak in short, as CI runs it: one fault of each kind through scripts/soak.py, each rerun and checked.

The full soak (52 faults, about an hour here) is `scripts/soak.py` with its defaults; its last figures are in
docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers_proxy import PausableProxy


@pytest.mark.slow
def test_a_short_soak_with_one_fault_of_each_kind_loses_and_duplicates_nothing(tmp_path):
    record = tmp_path / "soak.json"
    soak = subprocess.run([sys.executable, "scripts/soak.py", "--faults", "6", "--minutes", "20", "--seed", "3",
                           "--work", str(tmp_path / "work"), "--json", str(record)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1800, check=False)
    assert soak.returncode == 0, soak.stdout[-4000:] + soak.stderr[-3000:]
    trials = [t for t in json.loads(record.read_text())["trials"] if "skipped" not in t]
    kinds = {t["kind"] for t in trials}
    assert kinds >= {"driver", "moment", "actor", "node", "s3"}, kinds  # disk too where a tmpfs can be mounted
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
