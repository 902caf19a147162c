"""Print bench/llm.sh results: per thread count, each engine's prompt and generation tok/s
and peak RSS, and mote's speed as a multiple of llama.cpp's (above 1: mote is faster)."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'engine':<12}{'thr':>4}{'prompt tok/s':>14}{'gen tok/s':>11}{'peak RSS MiB':>14}{'model RSS MiB':>15}")
for r in sorted(rows, key=lambda r: (r["threads"], r["engine"])):
    print(f"{r['engine']:<12}{r['threads']:>4}{r['prompt_tok_s']:>14.1f}{r['gen_tok_s']:>11.1f}"
          f"{r['peak_rss_mib']:>14.1f}{r['model_rss_mib']:>15.1f}")
for t in sorted({r["threads"] for r in rows}):
    m = next((r for r in rows if r["threads"] == t and r["engine"] == "mote"), None)
    l = next((r for r in rows if r["threads"] == t and r["engine"] == "llama.cpp"), None)
    if m and l:
        print(f"threads {t}: mote/llama.cpp prompt {m['prompt_tok_s'] / l['prompt_tok_s']:.2f}x, "
              f"generation {m['gen_tok_s'] / l['gen_tok_s']:.2f}x, "
              f"peak RSS {m['peak_rss_mib'] / l['peak_rss_mib']:.2f}x")
