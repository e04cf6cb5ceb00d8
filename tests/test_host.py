"""jax_tw.host: glibc kept from handing freed memory back (page faults per call)."""

import pathlib
import re
import subprocess
import sys

import pytest

from jax_tw import host
from twcheck import subprocess_env


def _faults(mode: str) -> tuple[float, int]:
    script = pathlib.Path(__file__).with_name("malloc_check.py")
    done = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                          timeout=300, env=subprocess_env(JAX_PLATFORMS="cpu"))  # glibc's pages
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(rf"malloc_check {mode} median faults (\d+) pages (\d+)", done.stdout)
    assert found, done.stdout
    return float(found[1]), int(found[2])


@pytest.mark.skipif(host._mallopt() is None, reason="glibc's malloc settings")
def test_keep_freed_memory_stops_fresh_pages():
    """A 64 MiB output, 20 calls: under glibc's defaults each call faults in fresh pages (its
    block is an mmap of its own); with keep_freed_memory() the heap's blocks are reused (the
    median call faults in none: the heap may still grow on a few calls)."""
    kept, pages = _faults("keep")
    default, _ = _faults("default")
    assert kept <= 0.05 * pages, (kept, pages)
    assert default > 4 * kept, (default, kept)


def test_malloc_setting_names_what_it_did():
    assert host.malloc_setting(keep=False) == "as the environment set it up"
    import jax
    jax.numpy.zeros(1).block_until_ready()  # JAX is running in this process: nothing is changed
    assert host.malloc_setting(keep=True) == "as it was (JAX was already running)"
