#!/usr/bin/env python3
"""Plots bench/datapath-vs-kube-proxy.csv (written by the `bench_datapath_vs_kube_proxy`
lab test) as one SVG: connect p50, connect p99, and one endpoint change, against the
service count. Standard library only, so it runs on any machine that has python3.

    python3 scripts/plot-bench.py [CSV] [SVG]
    python3 scripts/plot-bench.py --table [CSV]   # markdown tables for BENCHMARKS.md
"""

import csv
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = "--table" in sys.argv[1:]
ARGS = [a for a in sys.argv[1:] if a != "--table"]
SRC = Path(ARGS[0]) if len(ARGS) > 0 else ROOT / "bench" / "datapath-vs-kube-proxy.csv"
DST = Path(ARGS[1]) if len(ARGS) > 1 else ROOT / "bench" / "datapath-vs-kube-proxy.svg"

KP, KS = "#d62728", "#1f77b4"  # kube-proxy red, kubeshift blue
PANEL_W, PANEL_H = 420, 300
M_LEFT, M_TOP, M_BOTTOM = 64, 48, 56


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def label(n, eps):
    s = f"{n:,}"
    return s if eps == 1 else f"{s} × {eps}"


def load(path):
    rows = list(csv.DictReader(open(path, newline="")))
    for r in rows:
        r["n"], r["eps"] = int(r["services"]), int(r["endpoints_per_service"])
    return rows


def nice_ticks(lo, hi, log):
    if log:
        return [10**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    step = 10 ** math.floor(math.log10(max(hi, 1e-9) / 4))
    for m in (1, 2, 2.5, 5, 10):
        if hi / (step * m) <= 6:
            step *= m
            break
    return [i * step for i in range(0, int(hi / step) + 2)]


def fmt_tick(v, unit):
    if unit == "ms" and v < 1:
        return f"{v:g}"
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"


def panel(out, x0, y0, title, cats, series, unit, log=False, target=None):
    """series: (name, colour, dashed, {cat index: (mid, lo, hi)})"""
    w, h = PANEL_W - M_LEFT - 16, PANEL_H - M_TOP - M_BOTTOM
    px, py = x0 + M_LEFT, y0 + M_TOP
    vals = [v for _, _, _, pts in series for p in pts.values() for v in p if v and v > 0]
    if target:
        vals.append(target[0])
    if not vals:
        return
    if log:
        ticks = nice_ticks(min(vals), max(vals), True)
        lo, hi = math.log10(ticks[0]), math.log10(ticks[-1])
        ymap = lambda v: py + h - (math.log10(v) - lo) / (hi - lo) * h
    else:
        ticks = nice_ticks(0, max(vals), False)
        ticks = [t for t in ticks if t <= ticks[-1]]
        top = ticks[-1]
        ymap = lambda v: py + h - v / top * h
    xmap = lambda i: px + (i + 0.5) * w / len(cats)
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{y0 + 22}" text-anchor="middle" font-weight="bold">{esc(title)}</text>')
    out.append(f'<rect x="{px}" y="{py}" width="{w}" height="{h}" fill="none" stroke="#999"/>')
    for t in ticks:
        y = ymap(t)
        out.append(f'<line x1="{px}" x2="{px + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{px - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{fmt_tick(t, unit)}</text>')
    out.append(
        f'<text transform="translate({x0 + 14},{py + h / 2}) rotate(-90)" text-anchor="middle" font-size="12">{esc(unit)}{" (log)" if log else ""}</text>'
    )
    for i, c in enumerate(cats):
        out.append(f'<text x="{xmap(i):.1f}" y="{py + h + 16}" text-anchor="middle" font-size="11">{esc(c)}</text>')
    out.append(f'<text x="{px + w / 2}" y="{py + h + 36}" text-anchor="middle" font-size="12">services (× endpoints each)</text>')
    if target:
        y = ymap(target[0])
        out.append(f'<line x1="{px}" x2="{px + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#2ca02c" stroke-dasharray="2,3"/>')
        out.append(f'<text x="{px + w - 4}" y="{y - 4:.1f}" text-anchor="end" font-size="11" fill="#2ca02c">{esc(target[1])}</text>')
    for k, (name, colour, dashed, pts) in enumerate(series):
        dash = ' stroke-dasharray="5,4"' if dashed else ""
        idx = sorted(pts)
        # A small sideways offset per series keeps overlapping whiskers apart.
        off = (k - (len(series) - 1) / 2) * 4
        coords = [(xmap(i) + off, ymap(pts[i][0])) for i in idx]
        if len(coords) > 1:
            d = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for i, (x, y) in zip(idx, coords):
            _, lo_v, hi_v = pts[i]
            if lo_v is not None and hi_v is not None and hi_v > lo_v:
                out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{ymap(lo_v):.1f}" y2="{ymap(hi_v):.1f}" stroke="{colour}"/>')
            fill = "white" if dashed else colour
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{fill}" stroke="{colour}" stroke-width="1.5"/>')


def ms(v):
    return f"{v / 1e3:.1f} s" if v >= 1000 else (f"{v:.0f} ms" if v >= 10 else f"{v:.2f} ms")


def tables(rows):
    """Per-row table and the ratios the issue asks for, from the CSV."""
    print("| datapath | services × endpoints | ClusterIP, last rule p50 / p99 µs | ClusterIP, first rule p50 / p99 µs | pod IP p50 / p99 µs | one endpoint change, PUT → served (3 tries) | agent event → maps | load avg (1/5/15 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dp = r["datapath"] + (f" ({r['iptables']})" if r["datapath"] == "kube-proxy" else "")
        ch = ", ".join(ms(float(r[f"change{k}_ms"])) for k in (1, 2, 3) if r[f"change{k}_ms"])
        ag = ", ".join(ms(float(r[f"agent_sync{k}_ms"])) for k in (1, 2, 3) if r[f"agent_sync{k}_ms"]) or "–"
        pod = f"{float(r['pod_ip_p50_us']):,.0f} / {float(r['pod_ip_p99_us']):,.0f}"
        print(
            f"| {dp} | {label(r['n'], r['eps'])} | {float(r['clusterip_last_p50_us']):,.0f} / {float(r['clusterip_last_p99_us']):,.0f}"
            f" | {float(r['clusterip_first_p50_us']):,.0f} / {float(r['clusterip_first_p99_us']):,.0f} | {pod}"
            f" | {ch} | {ag} | {r['loadavg_1m']} / {r['loadavg_5m']} / {r['loadavg_15m']} |"
        )
    print()
    print(
        "| services × endpoints | kubeshift ClusterIP ÷ pod IP | kube-proxy last rule ÷ pod IP (rules present) | kube-proxy last ÷ first rule"
        " | kube-proxy last rule ÷ floor (pod IP, no kube-proxy rules) | kube-proxy last rule ÷ kubeshift ClusterIP"
        " | endpoint change, median: kube-proxy / kubeshift end to end / agent event → maps |"
    )
    print("|---|---|---|---|---|---|---|")
    by = {(r["datapath"], r["n"], r["eps"]): r for r in rows}
    for n, e in sorted({(r["n"], r["eps"]) for r in rows}):
        kp, ks = by.get(("kube-proxy", n, e)), by.get(("kubeshift", n, e))
        f = lambda r, c: float(r[c])
        med = lambda r, p: statistics.median([float(r[f"{p}{k}_ms"]) for k in (1, 2, 3) if r[f"{p}{k}_ms"]])
        cells = [
            f"{f(ks, 'clusterip_last_p50_us') / f(ks, 'pod_ip_p50_us'):.2f}" if ks else "–",
            f"{f(kp, 'clusterip_last_p50_us') / f(kp, 'pod_ip_p50_us'):.2f}" if kp else "–",
            f"{f(kp, 'clusterip_last_p50_us') / f(kp, 'clusterip_first_p50_us'):.2f}" if kp else "–",
            f"{f(kp, 'clusterip_last_p50_us') / f(ks, 'pod_ip_p50_us'):.1f}" if kp and ks else "–",
            f"{f(kp, 'clusterip_last_p50_us') / f(ks, 'clusterip_last_p50_us'):.1f}" if kp and ks else "–",
            " / ".join(
                [ms(med(kp, "change")) if kp else "–"]
                + ([ms(med(ks, "change")), ms(med(ks, "agent_sync"))] if ks else ["–", "–"])
            ),
        ]
        print(f"| {label(n, e)} | " + " | ".join(cells) + " |")


def main():
    rows = load(SRC)
    if TABLE:
        tables(rows)
        return
    keys = sorted({(r["n"], r["eps"]) for r in rows})
    cats = [label(n, e) for n, e in keys]
    at = {k: i for i, k in enumerate(keys)}

    def pick(datapath, col):
        pts = {}
        for r in rows:
            if r["datapath"] == datapath and r[col]:
                pts[at[(r["n"], r["eps"])]] = (float(r[col]), None, None)
        return pts

    def changes(datapath, prefix):
        pts = {}
        for r in rows:
            if r["datapath"] != datapath:
                continue
            v = [float(r[f"{prefix}{k}_ms"]) for k in (1, 2, 3) if r.get(f"{prefix}{k}_ms")]
            if v:
                pts[at[(r["n"], r["eps"])]] = (statistics.median(v), min(v), max(v))
        return pts

    backend = next((r["iptables"] for r in rows if r["datapath"] == "kube-proxy"), "?")
    kp = f"kube-proxy ({backend})"
    connect = lambda q: [
        (f"{kp} ClusterIP, last rule", KP, False, pick("kube-proxy", f"clusterip_last_{q}_us")),
        (f"{kp} pod IP", KP, True, pick("kube-proxy", f"pod_ip_{q}_us")),
        ("kubeshift ClusterIP", KS, False, pick("kubeshift", f"clusterip_last_{q}_us")),
        ("kubeshift pod IP", KS, True, pick("kubeshift", f"pod_ip_{q}_us")),
    ]
    change = [
        (f"{kp}: PUT → served", KP, False, changes("kube-proxy", "change")),
        ("kubeshift: PUT → served", KS, False, changes("kubeshift", "change")),
        ("kubeshift agent: event → maps", KS, True, changes("kubeshift", "agent_sync")),
    ]
    width, height = 3 * PANEL_W, PANEL_H + 96
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    panel(out, 0, 0, "New TCP connection, p50", cats, connect("p50"), "µs", log=True)
    panel(out, PANEL_W, 0, "New TCP connection, p99", cats, connect("p99"), "µs")
    panel(out, 2 * PANEL_W, 0, "One endpoint change (median, min–max of 3)", cats, change, "ms", log=True, target=(10, "target: 10 ms"))
    # Legend: the connect series under the first two panels, the change series under the third.
    def legend(x, y, items):
        for k, (name, colour, dashed, _) in enumerate(items):
            yy = y + k * 18
            dash = ' stroke-dasharray="5,4"' if dashed else ""
            fill = "white" if dashed else colour
            out.append(f'<line x1="{x}" x2="{x + 28}" y1="{yy}" y2="{yy}" stroke="{colour}" stroke-width="2"{dash}/>')
            out.append(f'<circle cx="{x + 14}" cy="{yy}" r="3.5" fill="{fill}" stroke="{colour}" stroke-width="1.5"/>')
            out.append(f'<text x="{x + 36}" y="{yy + 4}" font-size="12">{esc(name)}</text>')

    legend(M_LEFT, PANEL_H + 10, connect("p50")[:2])
    legend(M_LEFT + PANEL_W, PANEL_H + 10, connect("p50")[2:])
    legend(2 * PANEL_W + M_LEFT, PANEL_H + 10, change)
    utc = sorted(r["utc"] for r in rows)
    loads = [float(r["loadavg_1m"]) for r in rows]
    note = f"{SRC.name}: {utc[0]} – {utc[-1]}, load average (1 min) {min(loads):.1f}–{max(loads):.1f} on 2 cores"
    out.append(f'<text x="{width - 8}" y="{height - 8}" text-anchor="end" font-size="11" fill="#555">{esc(note)}</text>')
    out.append("</svg>")
    DST.write_text("\n".join(out) + "\n")
    print(f"wrote {DST}")


if __name__ == "__main__":
    main()
