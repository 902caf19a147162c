"""Print a benchmark JSONL file as a table: p50/p95 per engine, and each engine's p50 as a
multiple of mote's (above 1 means mote is faster). Standard library only."""
import json
import sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
# The native encoder runs the same MiniLM inputs: compare it with the anchors' MiniLM rows.
for r in list(rows):
    if r["engine"] != "mote" and r["case"].startswith("minilm_"):
        rows.append(dict(r, case=r["case"].replace("minilm_", "minilm_native_")))
        # mote's int8 against the anchors' fp32 (the issue's bar: int8 vs their fp32).
        rows.append(dict(r, case=r["case"].replace("minilm_", "minilm_int8_")))
# Several rounds of the same (engine, case, threads): medians of their p50s and p95s.
rounds = defaultdict(list)
for r in rows:
    rounds[(r["engine"], r["case"], r["threads"])].append(r)


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


by = defaultdict(dict)
engines = []
for (engine, case, threads), rs in rounds.items():
    by[(case, threads)][engine] = {
        "p50_ms": median([r["p50_ms"] for r in rs]),
        "p95_ms": median([r["p95_ms"] for r in rs]),
        "rounds": len(rs),
    }
    if engine not in engines:
        engines.append(engine)
print(f"medians over {max(len(rs) for rs in rounds.values())} round(s)")
head = f"{'case':<18}{'thr':>4}" + "".join(f"{e + ' p50/p95 ms':>28}" for e in engines)
others = [e for e in engines if e != "mote"]
head += "".join(f"{e + '/mote':>18}" for e in others)
print(head)
for (case, threads), res in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    line = f"{case:<18}{threads:>4}"
    for e in engines:
        r = res.get(e)
        cell = "%.2f / %.2f" % (r["p50_ms"], r["p95_ms"]) if r else "-"
        line += f"{cell:>28}"
    for e in others:
        if e in res and "mote" in res:
            line += f"{res[e]['p50_ms'] / res['mote']['p50_ms']:>18.2f}"
        else:
            line += f"{'-':>18}"
    print(line)
