"""Print bench/llm.sh results: per engine and thread count, the median over rounds of
prompt and generation tok/s and peak RSS, and mote's speed as a multiple of llama.cpp's
(above 1: mote is faster). Standard library only."""
import json
import statistics
import sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = defaultdict(list)
for r in rows:
    by[(r["engine"], r["threads"])].append(r)
med = {k: {f: statistics.median(r[f] for r in v) for f in
           ("prompt_tok_s", "gen_tok_s", "peak_rss_mib", "model_rss_mib")} | {"rounds": len(v)}
       for k, v in by.items()}
print(f"{'engine':<12}{'thr':>4}{'rounds':>7}{'prompt tok/s':>14}{'gen tok/s':>11}{'peak RSS MiB':>14}{'model RSS MiB':>15}")
for (e, t), m in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"{e:<12}{t:>4}{m['rounds']:>7}{m['prompt_tok_s']:>14.1f}{m['gen_tok_s']:>11.1f}"
          f"{m['peak_rss_mib']:>14.1f}{m['model_rss_mib']:>15.1f}")
for t in sorted({t for _, t in med}):
    m, l = med.get(("mote", t)), med.get(("llama.cpp", t))
    if m and l:
        print(f"threads {t}: mote/llama.cpp prompt {m['prompt_tok_s'] / l['prompt_tok_s']:.2f}x, "
              f"generation {m['gen_tok_s'] / l['gen_tok_s']:.2f}x, "
              f"peak RSS {m['peak_rss_mib'] / l['peak_rss_mib']:.2f}x")
