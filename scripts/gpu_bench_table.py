"""The GPU table of scripts/gpu-bench.sh from its raw results: ours.jsonl and fork.jsonl (one
JSON object per line, each with the "spec" the script added), and the depth of the third column.
usage: python3 scripts/gpu_bench_table.py OURS.jsonl FORK.jsonl DEPTH"""
import json, sys

def load(path):
    rows = {}
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            test = ("pp" if r["n_gen"] == 0 else "tg", r["n_depth"])
            rows[(r["spec"], test)] = (r["avg_ts"], r.get("stddev_ts", 0.0))
    return rows

ours, fork, depth = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
specs = list(dict.fromkeys(s for s, _ in ours))
tests = [("pp", 0), ("tg", 0), ("tg", depth)]
names = ["pp512", "tg128", f"tg64 @ d{depth}"]
cell = lambda r: f"{r[0]:.1f} ± {r[1]:.1f}" if r else "—"
print("| K / V | " + " | ".join(f"{n} ours | {n} fork" for n in names)
      + " | " + " | ".join(f"{n} vs our f16 | {n} vs fork" for n in names) + " |")
print("|---|" + "---:|" * (4 * len(names)))
for s in specs:
    row = [s]
    for t in tests:
        row += [cell(ours.get((s, t))), cell(fork.get((s, t)))]
    for t in tests:
        o, f16, fk = ours.get((s, t)), ours.get(("f16", t)), fork.get((s.split("/")[0], t))
        row.append(f"{o[0] / f16[0]:.2f}×" if o and f16 else "—")
        row.append(f"{o[0] / fk[0]:.2f}×" if o and fk else "—")
    print("| " + " | ".join(row) + " |")
