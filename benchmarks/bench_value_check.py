"""What the value check at the library boundary costs ``dct-distort``, in one process.

Issue 9, item 8 compares throughput before and after the redesign (``bench_compare_revisions.py``);
issue 11 made every defense call check its input's values (finite, in [0, 1]). ``dct-distort``
does that inside Step 1's kernel, one integer ``aminmax`` per step on data in cache
(``kernels/dct_quant.py``). This script times the user-facing call ``defense(x, generator=...)``
against the same call with that check turned off (inside ``validation.no_value_checks()``; the
boundary's shape and dtype checks stay), alternating call by call,
and reports the median of the per-pair ratios with a bootstrap 95% interval
(``scipy.stats.bootstrap``). The two outputs are checked equal first.

Usage::

    python benchmarks/bench_value_check.py [--threads 1] [--pairs 40] [--batch 64] [--size 299]

Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the other throughput benchmarks: huge pages for big buffers

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from prepdefense import defenses  # noqa: E402
from prepdefense.validation import no_value_checks  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=40, help="alternating (checked, unchecked) pairs timed")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=299)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    defense = defenses.create("dct-distort")

    def checked(g):
        return defense(x, generator=g)

    def unchecked(g):
        with no_value_checks():
            return defense(x, generator=g)

    if not torch.equal(checked(torch.Generator().manual_seed(1)), unchecked(torch.Generator().manual_seed(1))):
        print("the two calls disagree: not comparable", file=sys.stderr)
        return 1
    ratios, times = [], {"checked": [], "unchecked": []}
    for i in range(args.pairs):
        pair = {}
        order = (("checked", checked), ("unchecked", unchecked)) if i % 2 == 0 else (("unchecked", unchecked), ("checked", checked))
        for name, call in order:
            g = torch.Generator().manual_seed(i)
            t0 = time.perf_counter()
            call(g)
            pair[name] = time.perf_counter() - t0
            times[name].append(pair[name])
        ratios.append(pair["checked"] / pair["unchecked"])
    r = np.asarray(ratios[2:])  # the first pairs warm the caches and the allocator
    ci = stats.bootstrap((r,), np.median, n_resamples=2000, confidence_level=0.95, method="percentile",
                         random_state=np.random.default_rng(0)).confidence_interval
    print(f"dct-distort, {args.batch} images {args.size}x{args.size}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}")
    print(f"  checked   {1000 * statistics.median(times['checked'][2:]):.1f} ms per call (median)")
    print(f"  unchecked {1000 * statistics.median(times['unchecked'][2:]):.1f} ms per call (median)")
    print(f"  checked / unchecked: {float(np.median(r)):.3f} (95% CI {ci.low:.3f}-{ci.high:.3f}) over {len(r)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
