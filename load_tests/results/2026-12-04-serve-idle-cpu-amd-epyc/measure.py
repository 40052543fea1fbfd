"""CPU share of each Ray/Serve process over 40 s of an idle `pdserve serve` (percent of one core)."""

import time

import psutil

WINDOW_S = 40
KEYS = ("ray", "Serve", "Proxy", "Dashboard", "log_monitor", "gcs", "pdserve")


def snap() -> dict[int, tuple[float, str]]:
    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            t = p.cpu_times()
            name = " ".join(p.info["cmdline"] or [p.info["name"]])[:60]
            out[p.pid] = (t.user + t.system, name)
        except psutil.Error:
            pass
    return out


a = snap()
time.sleep(WINDOW_S)
b = snap()
rows = [((b[k][0] - a[k][0]) / WINDOW_S * 100, b[k][1]) for k in b if k in a]
rows = sorted((r for r in rows if any(s in r[1] for s in KEYS)), reverse=True)
for pct, name in rows[:10]:
    print(f"{pct:6.2f}%  {name}")
print(f"total {sum(r[0] for r in rows):.2f}%")
