#!/bin/bash
# What recording traffic costs a request (issue 29's "recording adds < 1 % to p50 latency at
# 8 clients"): every request explored (--explore-share 1, the worst case), the same load test
# against a server without and with --record-dir, ROUNDS rounds, the order swapped every round
# (odd rounds: off first) so neither side always follows a server's shutdown; each run starts
# its own server on the embedded model. Writes results/recording_overhead/{off,on}-K.json
# (benchmarks/loadtest.py's reports) and summary.{json,png}.
#   bash benchmarks/recording_overhead.sh [LAST_ROUND]   (FIRST_ROUND=K in the environment: start at K)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/recording_overhead
STORE=$(mktemp -d)
mkdir -p "$OUT"
for round in $(seq "${FIRST_ROUND:-1}" "${1:-6}"); do
  order="off on"
  if [ $((round % 2)) -eq 0 ]; then order="on off"; fi
  for mode in $order; do
    extra=""
    if [ "$mode" = on ]; then extra="--record-dir $STORE/$round"; fi
    echo "== round $round, recording $mode, load $(cut -d' ' -f1 /proc/loadavg)"
    .venv/bin/python benchmarks/loadtest.py --concurrency 8 --requests 48 --modes auto \
      --server-args "--explore-share 1 $extra" --out "$OUT/$mode-$round.json" | tail -3
    rm -f "$OUT/$mode-$round.png"
  done
done
.venv/bin/python - "$OUT" <<'PY'
import glob, json, statistics, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = sys.argv[1]
def round_of(path: str) -> int:
    return int(path.rsplit("-", 1)[1].split(".")[0])
files = {m: sorted(glob.glob(f"{out}/{m}-*.json"), key=round_of) for m in ("off", "on")}
runs = {m: [json.load(open(f))["runs"][0] for f in fs] for m, fs in files.items()}
summary = {
    m: {
        "p50_s": [r["latency_p50_s"] for r in rs],
        "tokens_per_s": [r["tokens_per_s"] for r in rs],
        "median_p50_s": statistics.median(r["latency_p50_s"] for r in rs),
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
    }
    for m, rs in runs.items()
}
summary["p50_change"] = summary["on"]["median_p50_s"] / summary["off"]["median_p50_s"] - 1
pairs = [b / a - 1 for a, b in zip(summary["off"]["p50_s"], summary["on"]["p50_s"])]
summary["paired_p50_change"] = {"per_round": pairs, "median": statistics.median(pairs)}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
fig, ax = plt.subplots(figsize=(6, 3.5))
for m in ("off", "on"):
    ax.plot(range(1, len(summary[m]["p50_s"]) + 1), summary[m]["p50_s"], "o-", label=f"recording {m}")
ax.set(xlabel="round", ylabel="E2E p50 (s), 8 clients, every request explored", title="Recording overhead")
ax.legend()
fig.tight_layout()
fig.savefig(f"{out}/summary.png", dpi=100)
print(json.dumps({m: {k: v for k, v in s.items() if k.startswith("median")} for m, s in summary.items() if m in ("off", "on")}), "p50 change", f"{summary['p50_change']:+.1%}", "paired median", f"{summary['paired_p50_change']['median']:+.1%}")
PY
