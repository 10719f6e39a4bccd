"""PNG plots of the comparisons (matplotlib, imported lazily: `pip install -e '.[bench]'`).

``make_plots(comparisons, out_dir)`` -> ({comparison name: [relative png paths]}, note): one
function per comparison, reading the ``data`` dict ``benchmarks.suite`` stored for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_plots(comparisons: list[dict[str, Any]], out_dir: Path) -> tuple[dict[str, list[str]], str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, "plots skipped: matplotlib is not installed (pip install -e '.[bench]')"
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = {}
    failed = []
    for comp in comparisons:
        fn = _PLOTTERS.get(comp["name"])
        if fn is None or not comp.get("data"):
            continue
        try:
            for stem, fig in fn(plt, comp["data"]):
                path = out_dir / f"{stem}.png"
                fig.tight_layout()
                fig.savefig(path, dpi=110)
                plt.close(fig)
                made.setdefault(comp["name"], []).append(f"plots/{path.name}")
        except Exception as exc:  # noqa: BLE001 - a plot must never cost the recorded results
            plt.close("all")
            failed.append(f"{comp['name']}: {type(exc).__name__}: {exc}")
    return made, ("plots failed: " + "; ".join(failed)) if failed else ""


def _ms(x):
    return None if x is None else x * 1e3


def _log_x(ax, ticks) -> None:
    """Log x axis with a plain label at each measured point (0.25, 1, 4; not 2.5x10^-1)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ticks = sorted(set(ticks))
    if ticks:
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _isolation(plt, data):
    modes = [m for m, d in data.get("modes", {}).items() if d.get("alone") and d.get("loaded")]
    if not modes:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for i, (key, label) in enumerate((("alone", "text alone"), ("loaded", "text + multi-image load"))):
        for j, stat in enumerate(("p50", "p99")):
            xs = [k + (2 * i + j - 1.5) * width for k in range(len(modes))]
            ys = [_ms(data["modes"][m][key]["tpot"][stat]) or 0 for m in modes]
            ax.bar(xs, ys, width, label=f"{label}, {stat}", alpha=0.5 + 0.5 * j, color=f"C{i}")
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("TPOT of the text streams, ms")
    ax.set_title("Decode isolation: text TPOT with and without a multi-image load")
    ax.legend(fontsize=8)
    yield "isolation_tpot", fig


def _goodput(plt, data):
    targets = data.get("targets", {})
    if not targets:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, t) in enumerate(targets.items()):
        probes = sorted(t.get("probes", []), key=lambda p: p["rate"])
        if probes:
            ax.plot([p["rate"] for p in probes], [p["attainment"] for p in probes], "o-", color=f"C{i}",
                    label=f"{name}: goodput {t.get('goodput_rps', 0):.2g} req/s")
    ax.axhline(data.get("target", 0.9), color="grey", linestyle="--", linewidth=1)
    _log_x(ax, [p["rate"] for t in targets.values() for p in t.get("probes", [])])
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("request rate, req/s (Poisson)")
    ax.set_ylabel("SLO attainment")
    slo = data.get("slo", {})
    ax.set_title(f"Goodput, multi-image mix (TTFT ≤ {slo.get('ttft_ms', 0):.0f} ms, TPOT ≤ {slo.get('tpot_ms', 0):.0f} ms)")
    ax.legend(fontsize=8)
    yield "goodput", fig


def _kv_transfer(plt, data):
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {"memcpy": data.get("memcpy", []), **data.get("transports", {})}
    for i, (name, rows) in enumerate(series.items()):
        rows = [r for r in rows if r.get("gbps")]
        if rows:
            ax.plot([r["bytes"] / 2**20 for r in rows], [r["gbps"] for r in rows], "o-" if name != "memcpy" else "k--",
                    label=name)
    _log_x(ax, [r["bytes"] / 2**20 for rows in series.values() for r in rows])
    ax.set_yscale("log")
    ax.set_xlabel("payload, MiB")
    ax.set_ylabel("GB/s (log)")
    ax.set_title("KV transfer bandwidth vs this machine's memcpy")
    ax.legend(fontsize=8)
    yield "kv_transfer", fig


def _encoder_cache(plt, data):
    miss, hit = data.get("miss_ttft_s", []), data.get("hit_ttft_s", [])
    if not miss or not hit:
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.boxplot([[_ms(x) for x in miss], [_ms(x) for x in hit]])
    ax.set_xticks([1, 2], ["new image (miss)", "repeated image (hit)"])
    ax.set_ylabel("TTFT, ms")
    ax.set_title("Encoder + prefix cache")
    yield "encoder_cache", fig


def _scaling(plt, data):
    points = data.get("images", [])
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [p["prompt_tokens"] for p in points]
        ax.plot(xs, [_ms(p["ttft_s"]) for p in points], "o", alpha=0.6, label="requests")
        fit = data.get("fit", {})
        if fit.get("slope") is not None:
            lo, hi = min(xs), max(xs)
            ax.plot([lo, hi], [_ms(fit["slope"] * x + fit["intercept"]) for x in (lo, hi)], "k--",
                    label=f"fit: {fit['slope'] * 1e6:.1f} ms / 1k tokens, R² {fit['r2']:.3f}")
        ax.set_xlabel("prompt tokens (image tokens + text)")
        ax.set_ylabel("TTFT, ms")
        ax.set_title("TTFT vs image tokens per request")
        ax.legend(fontsize=8)
        yield "scaling_ttft", fig
    workers = data.get("decode_workers", [])
    if workers:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.bar([str(w["num_decode"]) for w in workers], [w["output_throughput"] for w in workers])
        ax.set_xlabel("decode workers")
        ax.set_ylabel("output tokens/s")
        ax.set_title("Throughput vs decode workers")
        yield "scaling_decode", fig


_PLOTTERS = {"isolation": _isolation, "goodput": _goodput, "kv_transfer": _kv_transfer,
             "encoder_cache": _encoder_cache, "scaling": _scaling}
