import psutil, time, sys
def snap():
    out={}
    for p in psutil.process_iter(["pid","name","cmdline"]):
        try:
            t=p.cpu_times(); out[p.pid]=(t.user+t.system, " ".join(p.info["cmdline"] or [p.info["name"]])[:60])
        except Exception: pass
    return out
a=snap(); time.sleep(40); b=snap()
rows=[((b[k][0]-a[k][0])/40*100, b[k][1]) for k in b if k in a]
rows=[r for r in rows if any(s in r[1] for s in ("ray","Serve","Proxy","Dashboard","log_monitor","gcs","pdserve"))]
rows.sort(reverse=True)
for pct,name in rows[:10]: print(f"{pct:6.2f}%  {name}")
print(f"total {sum(r[0] for r in rows):.2f}%")
