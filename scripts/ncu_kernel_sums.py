#!/usr/bin/env python3
"""Per-kernel GPU time of a run, from Nsight Compute's CSV (where a decode step's time goes).

usage (on the GPU machine):
  ncu --clock-control none --cache-control none --csv --log-file run.csv \\
      --metrics gpu__time_duration.sum dh-server bench -m 8b.gguf -ngl 99 -p 0 -n 3 -r 1 ...
  python3 scripts/ncu_kernel_sums.py run.csv [TAG] [LAYERS]

Prints, per kernel name, the launches, total and mean microseconds, and the kv_* kernels'
total per decode step (kv_step launches / LAYERS, default 32: the 8B shape). Compare two runs
(f16 against turbo4, before against after) kernel by kernel; ncu serializes launches, so the
totals are kernel time, not the step's wall time.
"""
import collections
import csv
import sys


def main():
    path = sys.argv[1]
    tag = sys.argv[2] if len(sys.argv) > 2 else path
    layers = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    total, count = collections.defaultdict(float), collections.Counter()
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        us = v / 1e3 if unit in ("nsecond", "ns") else v if unit in ("usecond", "us") else v * 1e3
        name = r["Kernel Name"].split("(")[0]
        total[name] += us
        count[name] += 1
    steps = count.get("kv_step", 0) / layers or 1
    kv = sum(v for n, v in total.items() if n.startswith("kv_"))
    print(f"== {tag}: {sum(count.values())} launches, {steps:g} decode steps, kv_* {kv / steps:.1f} us a step")
    for name, us in sorted(total.items(), key=lambda x: -x[1])[:20]:
        print(f"  {name[:60]:60s} n={count[name]:6d} total={us:10.1f} us mean={us / count[name]:8.2f} us")


if __name__ == "__main__":
    main()
