"""What queueing alone allows for `bench/serve-load.sh`'s half-load bar: Poisson arrivals at
50% utilisation, `c` servers (model instances) that each take up to `maxb` queued requests
as one batch costing S + (k - 1) * Sb. Prints p99 sojourn time in units of S (the
single-request service time). Standard library only; seeded.

    python3 bench/serve_queue_sim.py
"""
import random


def p99(c, maxb, sb=0.8, rho=0.5, n=200_000, seed=2):
    random.seed(seed)
    lam = rho * c  # S = 1
    t, arrivals = 0.0, []
    for _ in range(n):
        t += random.expovariate(lam)
        arrivals.append(t)
    free, i, lat = [0.0] * c, 0, []
    while i < n:
        w = min(range(c), key=lambda x: free[x])
        start = max(free[w], arrivals[i])
        j = i
        while j < n and arrivals[j] <= start and j - i < maxb:
            j += 1
        j = max(j, i + 1)
        end = start + 1.0 + (j - i - 1) * sb
        lat.extend(end - a for a in arrivals[i:j])
        free[w], i = end, j
    lat.sort()
    return lat[int(len(lat) * 0.99)]


for c in (1, 2):
    for maxb in (1, 4, 32):
        print(f"instances {c}, batches of up to {maxb:>2}: p99 = {p99(c, maxb):.2f} x S")
