"""What the suite prints and writes: tables, targets, JSON and charts."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from benchmarks import procs

if TYPE_CHECKING:
    from benchmarks.suite import Context, Run

REPO = Path(__file__).resolve().parent.parent
Row = dict[str, Any]
Summary = dict[str, list[Row]]

#: The issue's targets on Python 3.11 and older, and on 3.12+ (trivial tasks).
TRIVIAL_TARGET = 0.4 if sys.version_info >= (3, 12) else 0.25
COST_KEYS = ("master_cpu_ms", "helper_cpu_ms", "task_cpu_ms", "total_cpu_ms",
             "master_minflt", "helper_minflt", "task_minflt")


# -- summaries --------------------------------------------------------------------------


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _slots(name: str) -> int:
    from benchmarks.suite import CONTENDERS, FLOOR_1

    return 1 if name == FLOOR_1 else CONTENDERS[name].slots


def summarise(runs: Sequence[Run], args: argparse.Namespace) -> Summary:
    """One row per contender and workload, medians over the rounds."""
    summary: Summary = {}
    for workload in args.workload_list:
        by_name: dict[str, list[Run]] = {}
        for run in runs:
            if run.workload == workload.name:
                by_name.setdefault(run.contender, []).append(run)
        if not by_name:
            continue
        rows = [_row(name, group, workload) for name, group in by_name.items()]
        _add_ratios(rows, workload)
        summary[workload.name] = rows
    return summary


def _row(name: str, runs: list[Run], workload: Any) -> Row:
    row: Row = {"contender": name, "slots": _slots(name), "runs": len(runs),
                "tasks": _median(r.tasks for r in runs)}
    rates = [r.rate for r in runs if r.rate is not None]
    if rates:
        row.update(rate=statistics.median(rates), rate_min=min(rates), rate_max=max(rates))
        if workload.sleep_ms:
            row["x_ideal"] = row["rate"] / (row["slots"] * 1e3 / workload.sleep_ms)
    row["startup_s"] = _median(r.startup_s for r in runs)
    for key in COST_KEYS:
        row[key] = _median(r.costs.get(key) for r in runs)
    for key in ("peak_rss_mib", "peak_pss_mib", "end_rss_mib", "end_pss_mib", "worker_rss_mib"):
        row[key] = _median(getattr(r, key) for r in runs)
    pss = [r.peak_pss_mib for r in runs if r.peak_pss_mib is not None]
    if pss:
        row.update(peak_pss_min=min(pss), peak_pss_max=max(pss))
    latencies = [x for r in runs for x in r.latencies_ms]
    if latencies:
        row.update(n=len(latencies), p50_ms=procs.percentile(latencies, 50),
                   p99_ms=procs.percentile(latencies, 99), max_ms=max(latencies))
    exited = [x for r in runs for x in r.extra.get("exited_ms", [])]
    if exited:
        row.update(exited_p50_ms=procs.percentile(exited, 50),
                   exited_p99_ms=procs.percentile(exited, 99))
    for key in ("forking_rss_mib", "fork_server_rss_mib"):
        row[key] = _median(r.extra.get(key) for r in runs)
    sources = sorted({r.extra["source"] for r in runs if r.extra.get("source")})
    if sources:
        row["source"] = "/".join(sources)
    phases = [r.extra["child_phases"] for r in runs if r.extra.get("child_phases")]
    if phases:
        row["child_phases"] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    return row


def _add_ratios(rows: list[Row], workload: Any) -> None:
    by_name = {row["contender"]: row for row in rows}
    prefork = by_name.get("prefork", {})
    floors = {2: by_name.get("fork-floor", {}).get("rate"),
              1: by_name.get("fork-floor-1", {}).get("rate")}
    for row in rows:
        if row.get("rate") and prefork.get("rate"):
            base = prefork["rate"]
            row.update(x_prefork=row["rate"] / base, x_prefork_min=row["rate_min"] / base,
                       x_prefork_max=row["rate_max"] / base)
        floor = floors.get(row["slots"])
        if row.get("rate") and floor and not row["contender"].startswith("fork-floor"):
            row["x_floor"] = row["rate"] / floor
        if workload.kind == "memory" and row.get("peak_pss_mib") and prefork.get("peak_pss_mib"):
            row["x_prefork_pss"] = row["peak_pss_mib"] / prefork["peak_pss_mib"]
        if workload.kind == "memory" and row.get("peak_pss_mib") and row.get("worker_rss_mib"):
            row["x_one_copy"] = row["peak_pss_mib"] / row["worker_rss_mib"]
        if workload.kind == "leak" and row.get("end_pss_mib") and prefork.get("end_pss_mib"):
            row["x_prefork_pss"] = row["end_pss_mib"] / prefork["end_pss_mib"]
        if workload.kind == "latency" and row.get("p50_ms") and prefork.get("p50_ms"):
            row["x_prefork_p50"] = row["p50_ms"] / prefork["p50_ms"]


# -- tables ------------------------------------------------------------------------------


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(title: str, rows: list[Row], columns: list[tuple[str, str, int, int]]) -> None:
    """columns: (header, key, width, digits); digits < 0 for text."""
    print(f"\n{title}\n")
    header = "".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}"
                     for i, (h, _, w, _) in enumerate(columns))
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for i, (_, key, width, digits) in enumerate(columns):
            value = row.get(key)
            if digits < 0 or isinstance(value, str):
                text = "" if value is None else str(value)
            else:
                text = _fmt(value, digits)
            cells.append(f"{text:<{width}}" if i == 0 else f"{text:>{width}}")
        print("".join(cells))


def print_tables(summary: Summary, args: argparse.Namespace) -> None:
    from benchmarks.suite import workload_named

    for name, rows in summary.items():
        workload = workload_named(name)
        if workload.kind == "throughput":
            kind = "trivial" if not workload.sleep_ms else f"{workload.sleep_ms:g} ms"
            third = ("x floor", "x_floor") if not workload.sleep_ms else ("x ideal", "x_ideal")
            _table(f"[{name}] {kind} tasks, pre-queued; rate = (N-1)/(last - first completion); "
                   f"median (min-max) of {args.rounds} round(s); the fork floor in forks/s; "
                   "x floor: same number of slots", rows, [
                       ("contender", "contender", 18, -1), ("slots", "slots", 6, 0),
                       ("tasks", "tasks", 7, 0), ("tasks/s", "rate", 9, 1),
                       ("min", "rate_min", 8, 1), ("max", "rate_max", 8, 1),
                       ("x prefork", "x_prefork", 10, 2), (third[0], third[1], 8, 2),
                       ("start-up s", "startup_s", 11, 2)])
            if not workload.sleep_ms:
                _table(f"[{name}] CPU ms and minor faults per task, by process "
                       "(master: the worker; helper: forkguard's fork server or rq "
                       "worker-pool's workers; task procs: the processes that run the tasks, "
                       "reaped ones included)", rows, [
                           ("contender", "contender", 18, -1),
                           ("master CPU", "master_cpu_ms", 11, 2),
                           ("helper CPU", "helper_cpu_ms", 11, 2),
                           ("task procs CPU", "task_cpu_ms", 15, 2),
                           ("total CPU", "total_cpu_ms", 10, 2),
                           ("master faults", "master_minflt", 14, 0),
                           ("task procs faults", "task_minflt", 18, 0),
                           ("end RSS MiB", "end_rss_mib", 12, 1),
                           ("end PSS MiB", "end_pss_mib", 12, 1)])
                floor = [r for r in rows if r["contender"].startswith("fork-floor")]
                if floor:
                    _table(f"[{name}] the fork floor: forks/s of a loaded worker "
                           "(the forking process's RSS; forkguard's fork server's for comparison)",
                           floor, [("contender", "contender", 18, -1), ("slots", "slots", 6, 0),
                                   ("forks/s", "rate", 9, 1), ("min", "rate_min", 8, 1),
                                   ("max", "rate_max", 8, 1),
                                   ("parent CPU ms", "master_cpu_ms", 14, 3),
                                   ("child CPU ms", "task_cpu_ms", 13, 3),
                                   ("child faults", "task_minflt", 13, 0),
                                   ("forked from", "source", 12, -1),
                                   ("RSS MiB", "forking_rss_mib", 9, 1),
                                   ("server RSS MiB", "fork_server_rss_mib", 15, 1)])
            for row in rows:
                if row.get("child_phases"):
                    print(f"\n{row['contender']} child, median over its children (ms from fork):")
                    for key, value in row["child_phases"].items():
                        print(f"  {key:<28}{value:>10.3f}")
        elif workload.kind == "memory":
            _table(f"[{name}] app preloading {args.preload_mb:g} MiB of objects, each task "
                   f"reads {args.touch_share:.0%} of them; whole worker tree sampled every "
                   "100 ms", rows, [
                       ("contender", "contender", 18, -1), ("tasks", "tasks", 7, 0),
                       ("peak PSS MiB", "peak_pss_mib", 13, 1),
                       ("peak RSS MiB", "peak_rss_mib", 13, 1),
                       ("end PSS MiB", "end_pss_mib", 12, 1),
                       ("x prefork PSS", "x_prefork_pss", 14, 2),
                       ("worker RSS MiB", "worker_rss_mib", 15, 1),
                       ("x one copy", "x_one_copy", 11, 2),
                       ("tasks/s", "rate", 9, 1), ("start-up s", "startup_s", 11, 2)])
            print("x one copy: peak PSS over the worker's own RSS. Each page the worker maps "
                  "counts once in the tree's PSS,\nso 1.00 is the floor for any pool whose "
                  "worker holds the app.")
        elif workload.kind == "leak":
            _table(f"[{name}] each task leaks {args.leak_mb:g} MiB; the worker tree once "
                   "all ran", rows, [
                       ("contender", "contender", 18, -1), ("tasks", "tasks", 7, 0),
                       ("end RSS MiB", "end_rss_mib", 12, 1),
                       ("end PSS MiB", "end_pss_mib", 12, 1),
                       ("peak PSS MiB", "peak_pss_mib", 13, 1),
                       ("x prefork PSS", "x_prefork_pss", 14, 2)])
        elif workload.kind == "latency":
            for row in rows:
                if row.get("p50_ms", 0) > 10 * args.spacing_ms:
                    row["note"] = "saturated"
            _table(f"[{name}] publish-to-start latency, one task every {args.spacing_ms:g} ms "
                   "to a ready worker (ready: from Popen to a first task done)", rows, [
                       ("contender", "contender", 18, -1), ("tasks", "n", 7, 0),
                       ("p50 ms", "p50_ms", 9, 2), ("p99 ms", "p99_ms", 9, 2),
                       ("max ms", "max_ms", 9, 2), ("x prefork p50", "x_prefork_p50", 14, 2),
                       ("ready s", "startup_s", 8, 2), ("", "note", 11, -1)])
        elif workload.kind == "usr1":
            _table(f"[{name}] SIGUSR1 to the worker while a task runs: ms until the "
                   "child has exited, and until it is reaped (gone from /proc)", rows, [
                       ("contender", "contender", 18, -1), ("kills", "n", 7, 0),
                       ("exited p50", "exited_p50_ms", 11, 2),
                       ("exited p99", "exited_p99_ms", 11, 2),
                       ("gone p50", "p50_ms", 9, 2), ("gone p99", "p99_ms", 9, 2),
                       ("gone max", "max_ms", 9, 2)])


# -- targets --------------------------------------------------------------------------------


def _get(summary: Summary, workload: str, contender: str, key: str) -> Optional[float]:
    for row in summary.get(workload, []):
        if row["contender"] == contender:
            value = row.get(key)
            return float(value) if value is not None else None
    return None


def targets(summary: Summary) -> list[Row]:
    """The issue's targets: informational, each met, not met or not measured."""
    out: list[Row] = []

    def ratio(name: str, a: Optional[float], b: Optional[float], want: float,
              at_least: bool = True, unit: str = "x") -> None:
        value = a / b if a is not None and b else None
        met = None if value is None else (value >= want if at_least else value <= want)
        figure = "-" if value is None else f"{value:.2f}{unit}"
        if a is not None and b:
            figure += f" ({a:.3g} / {b:.3g})"
        out.append({"target": name, "want": f"{'>=' if at_least else '<='} {want:g}{unit}",
                    "figure": figure, "value": value, "met": met})

    fg = "forkguard"
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    ratio(f"trivial: forkguard / prefork (Python {python})",
          _get(summary, "trivial", fg, "rate"), _get(summary, "trivial", "prefork", "rate"),
          TRIVIAL_TARGET)
    ratio("trivial: forkguard / fork floor (2 slots)", _get(summary, "trivial", fg, "rate"),
          _get(summary, "trivial", "fork-floor", "rate"), 0.85)
    ratio("trivial: forkguard / rq worker-pool -n 2", _get(summary, "trivial", fg, "rate"),
          _get(summary, "trivial", "rq-pool", "rate"), 3)
    ratio("10 ms: forkguard / prefork", _get(summary, "10ms", fg, "rate"),
          _get(summary, "10ms", "prefork", "rate"), 0.75)
    ratio("100 ms: forkguard / prefork", _get(summary, "100ms", fg, "rate"),
          _get(summary, "100ms", "prefork", "rate"), 0.95)
    ratio("worker (master) CPU per task: forkguard / prefork",
          _get(summary, "trivial", fg, "master_cpu_ms"),
          _get(summary, "trivial", "prefork", "master_cpu_ms"), 1.5, at_least=False)
    ratio("peak PSS: forkguard / prefork", _get(summary, "memory", fg, "peak_pss_mib"),
          _get(summary, "memory", "prefork", "peak_pss_mib"), 0.5, at_least=False)
    p99 = _get(summary, "usr1", fg, "p99_ms")
    out.append({"target": "USR1 kill p99 (until the child is gone)", "want": "<= 100 ms",
                "figure": "-" if p99 is None else f"{p99:.1f} ms", "value": p99,
                "met": None if p99 is None else p99 <= 100})
    ratio("publish-to-start p50: forkguard / prefork", _get(summary, "latency", fg, "p50_ms"),
          _get(summary, "latency", "prefork", "p50_ms"), 2, at_least=False)
    # The same targets with children forked ahead (forkguard_standby_children = 2).
    sb = "forkguard-standby"
    ratio("trivial: forkguard with standby children / prefork",
          _get(summary, "trivial", sb, "rate"), _get(summary, "trivial", "prefork", "rate"),
          TRIVIAL_TARGET)
    ratio("10 ms: forkguard with standby children / prefork", _get(summary, "10ms", sb, "rate"),
          _get(summary, "10ms", "prefork", "rate"), 0.75)
    ratio("100 ms: forkguard with standby children / prefork",
          _get(summary, "100ms", sb, "rate"), _get(summary, "100ms", "prefork", "rate"), 0.95)
    ratio("publish-to-start p50: forkguard with standby children / prefork",
          _get(summary, "latency", sb, "p50_ms"), _get(summary, "latency", "prefork", "p50_ms"),
          2, at_least=False)
    return out


def print_targets(rows: list[Row]) -> None:
    print("\ntargets of the issue (informational):")
    width = max(len(r["target"]) for r in rows)
    for r in rows:
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[r["met"]]
        print(f"  {r['target']:<{width}}  want {r['want']:<8}  got {r['figure']:<28} {verdict}")


# -- JSON ---------------------------------------------------------------------------------


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def environment(redis_version: Optional[str],
                load_at_start: Optional[tuple[float, ...]] = None) -> dict[str, Any]:
    import celery
    import kombu

    return {
        "cpu_model": _cpu_model(), "cores": os.cpu_count(), "kernel": platform.release(),
        "machine": platform.machine(), "memory_gib": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "python_implementation":
            platform.python_implementation(),
        "celery": celery.__version__, "kombu": kombu.__version__,
        "billiard": _version("billiard"), "rq": _version("rq"), "redis_py": _version("redis"),
        "redis_server": redis_version, "psutil": _version("psutil"),
        "matplotlib": _version("matplotlib"), "celery_forkguard": _version("celery-forkguard"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        # What the measured package differs from that commit in (nox installs the work tree).
        "git_changed": [line[3:] for line in _git("status", "--porcelain").splitlines()
                        if line[3:].startswith("celery_forkguard/")],
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"workload_list", "contender_list", "redis"}
    out = {k: v for k, v in vars(args).items() if k not in skip}
    out["workloads"] = [w.name for w in args.workload_list]
    return out


def write_json(ctx: Context, summary: Summary, target_rows: list[Row], charts: list[Path],
               started: float, duration: float) -> Path:
    try:
        redis_version = str(ctx.client.info("server").get("redis_version"))
    except Exception:
        redis_version = None
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / time.strftime("bench-%Y%m%d-%H%M%S.json", time.localtime(started))
    payload = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(duration, 1),
        "environment": environment(redis_version, ctx.load_at_start),
        "settings": settings(ctx.args),
        "summary": summary,
        "targets": target_rows,
        "errors": ctx.errors,
        "charts": [str(c.relative_to(REPO)) for c in charts],
        "runs": [asdict(r) for r in ctx.runs],
    }
    path.write_text(json.dumps(payload, indent=2))
    return path


def publish(charts: list[Path], results: Path, target: Path) -> None:
    """Copy the charts (without their date) and the summary to the docs."""
    target.mkdir(parents=True, exist_ok=True)
    for chart in charts:
        shutil.copyfile(chart, target / chart.name.split("-", 3)[-1])
    payload = json.loads(results.read_text())
    payload.pop("runs", None)
    payload["source"] = results.name
    (target / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"published to {target.relative_to(REPO)}")


# -- charts ---------------------------------------------------------------------------------


LABELS = {"forkguard": "forkguard -c 2", "forkguard-standby": "forkguard -c 2, 2 standby",
          "fork-floor": "fork floor, 2 at a time",
          "fork-floor-1": "fork floor, 1 at a time", "prefork": "prefork -c 2",
          "prefork-mtpc1": "prefork -c 2, 1 task/child", "solo": "solo (1 slot)",
          "threads": "threads -c 2", "rq-worker": "rq worker (1 slot)",
          "rq-pool": "rq worker-pool -n 2"}
COLOURS = {"forkguard": "#d62728", "forkguard-standby": "#ff9896", "fork-floor": "#7f7f7f",
           "fork-floor-1": "#c7c7c7",
           "prefork": "#1f77b4", "prefork-mtpc1": "#aec7e8", "solo": "#2ca02c",
           "threads": "#98df8a", "rq-worker": "#9467bd", "rq-pool": "#c5b0d5"}


def charts(summary: Summary, args: argparse.Namespace, out: Path, stamp: str) -> list[Path]:
    """PNG charts of the summary (matplotlib, Agg backend)."""
    preload_mb, touch_share, leak_mb = args.preload_mb, args.touch_share, args.leak_mb
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: no matplotlib, no charts (pip install matplotlib)")
        return []
    from benchmarks.suite import workload_named

    made: list[Path] = []
    title_note = f"{os.cpu_count()} cores, Python {platform.python_version()}"

    def save(fig: Any, name: str) -> None:
        path = out / f"bench-{stamp}-{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append(path)

    throughput = [(n, rows) for n, rows in summary.items()
                  if workload_named(n).kind == "throughput"
                  and any(r.get("x_prefork") for r in rows)]
    if throughput:
        # One row per contender, shared by every panel (a blank where it did not run).
        order: list[str] = []
        for _, rows in throughput:
            order += [r["contender"] for r in rows if r["contender"] not in order]
        order.reverse()
        row_of = {name: i for i, name in enumerate(order)}
        fig, axes = plt.subplots(1, len(throughput), figsize=(3.2 * len(throughput) + 2.6, 4.4),
                                 sharey=True, squeeze=False)
        for ax, (name, rows) in zip(axes[0], throughput):
            rows = [r for r in rows if r.get("x_prefork") is not None]
            values = [r["x_prefork"] for r in rows]
            high = [r["x_prefork_max"] - r["x_prefork"] for r in rows]
            ax.barh([row_of[r["contender"]] for r in rows], values,
                    xerr=[[r["x_prefork"] - r["x_prefork_min"] for r in rows], high],
                    capsize=3, color=[COLOURS.get(r["contender"], "#888888") for r in rows])
            ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
            for r in rows:
                ax.text(r["x_prefork_max"], row_of[r["contender"]], f" {r['x_prefork']:.2f}",
                        va="center", fontsize=8)
            ax.set_title("trivial tasks" if name == "trivial" else f"{name} tasks")
            ax.set_xlabel("tasks/s / prefork's\n(median, min-max)")
            ax.set_xlim(0, max(v + h for v, h in zip(values, high)) * 1.3)
        axes[0][0].set_yticks(range(len(order)), [LABELS.get(n, n) for n in order])
        fig.suptitle(f"Throughput relative to prefork -c 2 ({title_note})")
        fig.tight_layout()
        save(fig, "throughput")

    trivial = [r for r in summary.get("trivial", []) if r.get("total_cpu_ms") is not None
               and not r["contender"].startswith("fork-floor")]
    if trivial:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        names = [r["contender"] for r in trivial][::-1]
        left = [0.0] * len(names)
        for key, label, colour in (("master_cpu_ms", "worker (master)", "#1f77b4"),
                                   ("helper_cpu_ms", "fork server / rq workers", "#ff7f0e"),
                                   ("task_cpu_ms", "task processes", "#2ca02c")):
            values = [r.get(key) or 0.0 for r in trivial][::-1]
            ax.barh([LABELS.get(n, n) for n in names], values, left=left, label=label,
                    color=colour)
            left = [a + b for a, b in zip(left, values)]
        ax.set_xlabel("CPU ms per trivial task (median of rounds)")
        ax.set_title(f"CPU per task, by process ({title_note})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save(fig, "cpu")

    memory = [r for r in summary.get("memory", []) if r.get("peak_pss_mib")]
    leak = [r for r in summary.get("leak", []) if r.get("end_pss_mib")]
    panels = [(rows, key, label) for rows, key, label in (
        (memory, "peak_pss_mib", "peak PSS of the worker tree, MiB\n"
                                 f"(app preloading {preload_mb:g} MiB of objects, each task "
                                 f"reading {touch_share:.0%} of them)"),
        (leak, "end_pss_mib", "PSS of the worker tree after the leaking tasks, MiB\n"
                              f"(each task leaks {leak_mb:g} MiB)")) if rows]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8),
                                 squeeze=False)
        for ax, (rows, key, label) in zip(axes[0], panels):
            names = [r["contender"] for r in rows][::-1]
            values = [r[key] for r in rows][::-1]
            ax.barh([LABELS.get(n, n) for n in names], values,
                    color=[COLOURS.get(n, "#888888") for n in names])
            tasks = [r["tasks"] for r in rows][::-1]
            for i, (value, n) in enumerate(zip(values, tasks)):
                ax.text(value, i, f" {value:.0f} ({n:.0f} tasks)", va="center", fontsize=8)
            ax.set_xlabel(label)
            ax.set_xlim(0, max(values) * 1.45)
        fig.suptitle(f"Memory ({title_note})")
        fig.tight_layout()
        save(fig, "memory")

    latency = [r for r in summary.get("latency", []) if r.get("p50_ms")]
    if latency:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        names = [r["contender"] for r in latency][::-1]
        ys = list(range(len(names)))
        ax.barh([y + 0.2 for y in ys], [r["p50_ms"] for r in latency][::-1], height=0.4,
                label="p50", color="#1f77b4")
        ax.barh([y - 0.2 for y in ys], [r["p99_ms"] for r in latency][::-1], height=0.4,
                label="p99", color="#ff7f0e")
        ax.set_yticks(ys, [LABELS.get(n, n) + (" (saturated)" if r.get("note") else "")
                           for n, r in zip(names, latency[::-1])])
        ax.set_xscale("log")
        ax.set_xlabel("publish-to-start latency, ms (log scale)")
        ax.set_title(f"Latency of an idle worker ({title_note})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save(fig, "latency")
    return made
