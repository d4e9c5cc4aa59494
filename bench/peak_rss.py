"""Run a `jaxinduct` command in its own process and measure its wall time and peak resident memory.

The child reports VmHWM at exit, which starts afresh at exec (the parent's ru_maxrss would
carry over from the fork). Shared by the benchmarks that time whole commands.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

_PEAK_REPORTING = (
    "import atexit, re, resource, runpy, sys\n"
    "def peak():\n"
    "    try:\n"
    "        return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
    "    except (OSError, TypeError):\n"
    "        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "atexit.register(lambda: print(f'PEAK_RSS_KB {peak()}', file=sys.stderr))\n"
    "sys.argv = ['jaxinduct', *sys.argv[1:]]\n"
    "runpy.run_module('jaxinduct', run_name='__main__')\n"
)


def run_jaxinduct(args: Sequence[str], label: str) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of ``jaxinduct ARGS``; SystemExit naming ``label`` if it fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_REPORTING, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{label} failed: {done.stderr[-2000:]}")
    peak = int(done.stderr.rsplit("PEAK_RSS_KB ", 1)[1].split()[0]) / 1024
    return seconds, peak, done.stdout
