"""Stage-2 replicas on two "hosts" (Linux network namespaces joined to this one by veth links);
one host drops off the network mid-run (its link goes down: no TCP reset ever arrives). The
orchestrator's keepalive pings notice, the sample is retried on the other host, and every sample
equals an undisturbed run's.

Needs root and ``ip netns``; opt-in (``ILLUSION_NETNS_TESTS=1``) because the keepalive takes
about 20 s to give up on the lost host. Figures in docs/reliability.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import STAGE1_DIR, STAGE2_DIR
from test_replicas import Replica, assert_same_samples, generate
from test_services import running

pytestmark = pytest.mark.skipif(
    os.environ.get("ILLUSION_NETNS_TESTS") != "1" or os.geteuid() != 0
    or shutil.which("ip") is None,
    reason="network namespaces: run as root with ILLUSION_NETNS_TESTS=1",
)
HOSTS = {"ilr-a": "10.231.1", "ilr-b": "10.231.2"}  # namespace -> /24 of its link


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def front() -> Iterator[dict[str, str]]:
    with running("encoder", str(STAGE1_DIR)) as enc, running("stage1", str(STAGE1_DIR)) as s1:
        yield {"encoder": enc, "stage1": s1}


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, str]]:
    """Two namespaces, each linked to this one: namespace -> its address."""
    made: list[str] = []
    try:
        for ns, net in HOSTS.items():
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "add", f"{ns}-h", "type", "veth", "peer", "name", f"{ns}-n")
            ip("link", "set", f"{ns}-n", "netns", ns)
            ip("addr", "add", f"{net}.1/24", "dev", f"{ns}-h")
            ip("link", "set", f"{ns}-h", "up")
            ip("-n", ns, "addr", "add", f"{net}.2/24", "dev", f"{ns}-n")
            ip("-n", ns, "link", "set", f"{ns}-n", "up")
            ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.decode().strip()}")
    try:
        yield {ns: f"{net}.2" for ns, net in HOSTS.items()}
    finally:
        for ns in made:
            subprocess.run(["ip", "link", "del", f"{ns}-h"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_host_dropping_off_the_network_mid_run_loses_nothing(hosts, front, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="orchestrator.client")
    started = {ns: Replica("stage2", STAGE2_DIR, 0, "--host", address,
                           prefix=("ip", "netns", "exec", ns))
               for ns, address in hosts.items()}
    try:
        ready = {ns: replica.wait_ready() for ns, replica in started.items()}
        target = ",".join(r.address for r in ready.values())
        assert generate(front, target, tmp_path, "calm") == 0

        dropped: list[str] = []

        def partition() -> None:  # cut the link of whichever host starts sampling first
            base = {ns: r.steps for ns, r in ready.items()}
            while not dropped:
                for ns, replica in ready.items():
                    if replica.steps > base[ns]:
                        ip("link", "set", f"{ns}-h", "down")
                        dropped.append(ns)
                        return
                time.sleep(0.01)

        threading.Thread(target=partition, daemon=True).start()
        began = time.monotonic()
        assert generate(front, target, tmp_path, "cut") == 0
        took = time.monotonic() - began
        assert dropped, "no host was cut off"
        assert_same_samples(tmp_path / "cut", tmp_path / "calm")
        assert any("call lost" in r.getMessage() for r in caplog.records)
        logging.getLogger(__name__).warning("netns: host %s cut off mid-run; run took %.1f s",
                                            dropped[0], took)
    finally:
        for ns in HOSTS:
            subprocess.run(["ip", "link", "set", f"{ns}-h", "up"], capture_output=True)
        for replica in started.values():
            replica.stop()
