"""Recorded results: ``benchmarks/results/<date>-<machine>/`` with

    results.json    everything measured (per-request records included), the machine, the command
    summary.md      the headline table, one section per comparison, which cores ran what
    plots/*.png     one or more plots per comparison (matplotlib, the `bench` extra)

A comparison is a dict built by ``benchmarks.suite``::

    {"name", "title", "status": "ok" | "partial" | "skipped" | "failed", "reason",
     "headline": [{"metric", "value", "target", "met"}],      # the rows of the headline table
     "tables": [{"title", "columns", "rows"}], "notes": [str], "data": {...}}
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from datetime import date, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_ROOT = Path(__file__).parent / "results"
VERSIONED = ("torch", "transformers", "ray", "grpcio", "httpx", "numpy", "pydantic", "fastapi", "uvicorn")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return math.nan


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info(usable_cores: list[int] | None = None) -> dict[str, Any]:
    """CPU model, cores, memory, OS, GPU (if any), package versions, git commit."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        pass
    dirty = _git("status", "--porcelain")
    return {
        "cpu_model": _cpu_model(), "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores if usable_cores is not None else sorted(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(), "os": platform.platform(), "python": platform.python_version(),
        "gpu": gpu or "none", "versions": versions,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len(dirty.splitlines()) if dirty else 0,
    }


def machine_slug(info: dict[str, Any]) -> str:
    """A short folder-safe name of the machine, e.g. ``cpu2c-amd-epyc`` or ``h100-x1``."""
    if info.get("gpu", "none") != "none":
        count, _, name = info["gpu"].partition(" x ")
        token = next((t for t in name.lower().split() if re.search(r"\d", t)), name.lower().replace(" ", "-"))
        return f"{token}-x{count}"
    model = re.sub(r"\(r\)|\(tm\)|cpu|processor|\d+-core|@.*", "", info["cpu_model"].lower())
    model = "-".join(re.findall(r"[a-z0-9]+", model)[:3])
    return f"cpu{len(info['usable_cores'])}c" + (f"-{model}" if model else "")


def results_dir(info: dict[str, Any], root: Path = RESULTS_ROOT, day: date | None = None) -> Path:
    """``root/<date>-<machine>``; ``-2``, ``-3``... when that one already holds results."""
    base = root / f"{(day or date.today()).isoformat()}-{machine_slug(info)}"
    path, n = base, 1
    while (path / "results.json").exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


# -- writing ----------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def headline_rows(comparisons: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for comp in comparisons:
        if comp.get("status") in ("skipped", "failed") and not comp.get("headline"):
            rows.append([comp["title"], comp["status"], "–", "–", "–"])
        for h in comp.get("headline", []):
            rows.append([comp["title"], h["metric"], h["value"], h.get("target", ""), h.get("met")])
    return rows


def render_summary(results: dict[str, Any], plots: dict[str, list[str]]) -> str:
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [f"# Tessera benchmarks — {results['started_at'][:10]}, {machine_slug(m)}", "",
             f"- **Command**: `{results['command']}`",
             f"- **Machine**: {m['cpu_model']}, {m['logical_cores']} logical cores (usable: "
             f"{','.join(map(str, m['usable_cores']))}), {m['memory_gib']} GiB memory, GPU: {m['gpu']}; {m['os']}",
             f"- **Software**: Python {m['python']}, {versions}; commit {m['git_commit'] or '?'}"
             + (f" with {m['git_dirty_files']} uncommitted files" if m.get("git_dirty_files") else ""),
             f"- **Cores**: {results['layout_description']}",
             *(["- **Models**: " + ", ".join(f"{a} `{p}`" for a, p in results["models"].items())]
               if results.get("models") else []),
             f"- **Started** {results['started_at']}, **finished** {results.get('finished_at', '?')}", ""]
    if results.get("settings"):
        lines += ["Settings: " + ", ".join(f"{k}={_fmt(v) if not isinstance(v, (list, dict)) else v}"
                                           for k, v in results["settings"].items()), ""]
    lines += ["## Headline", ""]
    lines += markdown_table(["comparison", "metric", "value", "target", "met"], headline_rows(results["comparisons"]))
    lines.append("")
    for comp in results["comparisons"]:
        lines += [f"## {comp['title']}", ""]
        if comp.get("status") != "ok":
            lines += [f"**{comp.get('status')}**: {comp.get('reason', '')}", ""]
        for table in comp.get("tables", []):
            if table.get("title"):
                lines += [f"**{table['title']}**", ""]
            lines += markdown_table(table["columns"], table["rows"]) + [""]
        for plot in plots.get(comp["name"], []):
            lines += [f"![{comp['title']}]({plot})", ""]
        for note in comp.get("notes", []):
            lines.append(f"- {note}")
        if comp.get("notes"):
            lines.append("")
    placement = results.get("placement", [])
    if placement:
        lines += ["## Which cores ran what (observed in /proc while running)", ""]
        lines += markdown_table(["process", "pid", "allowed cores"],
                                [[p["process"], p["pid"], p["cores"]] for p in placement]) + [""]
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _clean(value: Any) -> Any:
    """NaN/inf -> None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_report(out_dir: Path, results: dict[str, Any]) -> Path:
    """Write results.json, the plots (when matplotlib is installed) and summary.md; returns the
    summary's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "finished_at": results.get("finished_at") or datetime.now().isoformat(timespec="seconds")}
    data = json.loads(json.dumps(results, default=_json_default))
    (out_dir / "results.json").write_text(json.dumps(_clean(data), indent=1, allow_nan=False))
    from benchmarks import plots

    made, note = plots.make_plots(data["comparisons"], out_dir / "plots")
    if note:
        for comp in data["comparisons"]:
            comp.setdefault("notes", []).append(note)
            break
    summary = out_dir / "summary.md"
    summary.write_text(render_summary(data, made))
    return summary
