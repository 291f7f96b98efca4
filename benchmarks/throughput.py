"""The throughput workloads of the benchmark suite (``benchmarks/suite.py``).

Kept so that ``python -m benchmarks.throughput`` still works: it runs the
suite with ``--workloads trivial`` unless told otherwise, e.g.::

    python -m benchmarks.throughput --tasks 2000 --rounds 3
    python -m benchmarks.throughput --workloads trivial,10ms,100ms
"""

from __future__ import annotations

import sys
from typing import Optional

from benchmarks.suite import main as suite_main


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--workloads" or a.startswith("--workloads=") for a in args):
        args = ["--workloads", "trivial", *args]
    return suite_main(args)


if __name__ == "__main__":
    sys.exit(main())
