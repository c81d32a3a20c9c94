"""A benchmark report as a printed table and a PNG plot (matplotlib, optional: `pip install photoninfer[bench]`)."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def format_report(report: dict) -> str:
    meta = report["meta"]
    workload = meta["workload"]
    lines = [f"{meta['device']} ({meta['torch_threads']} threads)  {meta['model']}  {meta['dtype']}  "
             f"workload {workload['name']}  commit {(meta['git']['commit'] or 'unknown')[:10]}"
             f"{' (dirty)' if meta['git']['dirty'] else ''}"]
    lines.append(f"{'engine':<14} {'start-up':>10} {'TTFT':>10} {'TTFT min':>10} {'TTFT p90':>10}  error")
    for name, engine in report["engines"].items():
        startup = "-" if engine["startup_s"] is None else f"{engine['startup_s']:.2f} s"
        spread = f"{_ms(engine['ttft_min_s']):>10} {_ms(engine['ttft_p90_s']):>10}"
        lines.append(f"{name:<14} {startup:>10} {_ms(engine['ttft_s']):>10} {spread}  {engine['error'] or ''}"[:200])
    if report["results"]:
        lines.append(f"{'engine':<14} {'batch':>10} {'requests':>9} {'out tokens':>11} {'time s':>9} "
                     f"{'out tok/s':>11} {'agreement':>10}")
        for row in report["results"]:
            agree = "" if row.get("agreement") is None else f"{row['agreement']:.3f}"
            lines.append(f"{row['engine']:<14} {row['label']:>10} {row['concurrency']:>9} {row['output_tokens']:>11} "
                         f"{row['elapsed_s']:>9.2f} {row['output_tok_per_s']:>11.1f} {agree:>10}")
    for prof in report.get("profile", []):
        if "error" in prof:
            lines.append(f"profile at concurrency {prof['concurrency']}: {prof['error']}")
            continue
        device = "" if prof["device_ms_per_step"] is None else (
            f", device {prof['device_ms_per_step']:.2f} ms, {prof['kernel_launches_per_step']:.0f} launches")
        lines.append(f"profile at concurrency {prof['concurrency']}: host {prof['host_ms_per_step']:.2f} ms{device} "
                     "per step")
        top = prof["top_ops_by_self_device_time"] or prof["top_ops_by_self_cpu_time"]
        lines += [f"    {op['self_ms_per_step']:8.3f} ms {op['percent']:5.1f}%  {op['name'][:90]}" for op in top[:5]]
    return "\n".join(lines)


def plot_path(json_path: str) -> str:
    root, ext = os.path.splitext(json_path)
    return (root if ext.lower() == ".json" else json_path) + ".png"


def write_plot(report: dict, path: str) -> bool:
    """Throughput by engine (and by concurrency for the standard workload), TTFT and start-up beside it.
    Returns False, with a warning, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'photoninfer[bench]'): no plot, JSON only")
        return False
    engines = list(report["engines"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    _plot_throughput(left, report, engines)
    _plot_latency(right, report, engines)
    meta = report["meta"]
    fig.suptitle(f"{meta['device']} · {os.path.basename(str(meta['model']))} · {meta['dtype']} · "
                 f"{meta['workload']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_throughput(ax, report: dict, engines: list[str]) -> None:
    rows = report["results"]
    if report["meta"]["workload"]["name"] == "standard":
        for name in engines:
            mine = [r for r in rows if r["engine"] == name]
            if mine:
                ax.plot([r["concurrency"] for r in mine], [r["output_tok_per_s"] for r in mine], marker="o", label=name)
        levels = sorted({r["concurrency"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrent requests")
        ax.legend()
    else:
        values = [next((r["output_tok_per_s"] for r in rows if r["engine"] == name), 0) for name in engines]
        ax.bar(engines, values)
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput")
    ax.grid(alpha=0.3)


def _plot_latency(ax, report: dict, engines: list[str]) -> None:
    ttft = [(report["engines"][n]["ttft_s"] or 0) * 1000 for n in engines]
    startup = [report["engines"][n]["startup_s"] or 0 for n in engines]
    positions = range(len(engines))
    ax.bar([p - 0.2 for p in positions], ttft, width=0.4, label="TTFT (ms)")
    ax2 = ax.twinx()
    ax2.bar([p + 0.2 for p in positions], startup, width=0.4, color="tab:orange", label="start-up (s)")
    ax.set_xticks(list(positions), engines)
    ax.set_ylabel(f"TTFT, {report['meta']['workload']['ttft_prompt_len']}-token prompt (ms)")
    ax2.set_ylabel("start-up (s)")
    ax.set_title("latency")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=8)
