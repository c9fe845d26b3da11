"""PNG figures of ``edgeprune bench pipeline``: latency over time per policy (like the paper's Figure 5),
attainment per policy, accuracy against attainment, and (after ``--rates``) attainment against arrival rate.
Drawn from the JSON document alone, so a committed ``docs/results/<scenario>.json`` can be re-plotted without
re-running."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from edgeprune.bench.pipeline import median, span

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_all(document: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = document["scenario"] + ("-quick" if document.get("quick") else "")
    return [_latency(document, out_dir / f"{name}-latency.png"),
            _attainment(document, out_dir / f"{name}-attainment.png"),
            _accuracy(document, out_dir / f"{name}-accuracy.png")] + (
        [_rates(document, out_dir / f"{name}-rates.png")] if document.get("rate_sweep") else [])


def _latency(document: dict, path: Path) -> Path:
    policies = document["policies"]
    fig, axes = plt.subplots(len(policies), 1, figsize=(9, 1.9 * len(policies) + 0.6), sharex=True, squeeze=False)
    nodes = list(document["nodes"])
    for ax, (policy, aggregated) in zip(axes[:, 0], policies.items()):
        result = aggregated["runs"][aggregated["median_run"]]  # the repeat with the median attainment
        for episode in document["slowdowns"]:
            ax.axvspan(episode["start_s"], episode["end_s"], color="orange", alpha=0.15, lw=0)
        series = result["latency_series"]
        if series:
            t, latency = zip(*series)
            ax.scatter(t, [1000 * v for v in latency], s=3, color="tab:blue")
        ax.axhline(1000 * document["slo_s"], color="red", lw=1, ls="--")
        ax.set_yscale("log")
        ax.set_ylabel("e2e ms")
        attained = result["attainment"]
        ax.set_title(f"{policy}: SLO met for {100 * attained:.0f}% of frames sent (median run)" if attained is not None
                     else policy, fontsize=9, loc="left")
        ratio_ax = ax.twinx()
        for node in nodes:
            steps = [(0.0, 0.0)] + [(t, detail.get(node, 0.0)) for t, kind, detail in result["ratio_series"]
                                    if kind in ("prune", "restore")]
            if len(steps) > 1:
                xs, ys = zip(*steps)
                ratio_ax.step(list(xs) + [document.get("duration_s", xs[-1])], list(ys) + [ys[-1]], where="post",
                              lw=1.2, label=f"{node} ratio")
        for t, kind, _ in result["ratio_series"]:
            if kind == "replace":
                ratio_ax.axvline(t, color="purple", lw=1, ls=":")
        ratio_ax.set_ylim(0, 1)
        ratio_ax.set_ylabel("ratio")
        if ratio_ax.get_legend_handles_labels()[0]:
            ratio_ax.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds since the camera started (slowdowns shaded; dotted: re-partitioning)")
    fig.suptitle(f"{document['scenario']}: end-to-end latency per frame, SLO {1000 * document['slo_s']:.0f} ms (red)",
                 fontsize=10)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _attainment(document: dict, path: Path) -> Path:
    policies = document["policies"]
    names = list(policies)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    values = [100 * (median(policies[p]["attainment"]) or 0) for p in names]
    spreads = [[100 * x for x in span(policies[p]["attainment"])] for p in names]
    bars = ax.bar(names, values, color="tab:green", yerr=[[v - lo for v, (lo, _) in zip(values, spreads)],
                                                         [hi - v for v, (_, hi) in zip(values, spreads)]], capsize=3)
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 1, f"{value:.0f}%", ha="center", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("% of frames sent within the SLO")
    ax.set_title(f"{document['scenario']}: SLO attainment per policy, median [min-max] over repeats (dropped or "
                 "failed frames count as misses)",
                 fontsize=9)
    return _save(fig, path)


def _accuracy(document: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, aggregated in document["policies"].items():
        result = {k: median(aggregated.get(k)) for k in ("attainment", "accuracy_measured", "accuracy_predicted_mean")}
        if result["attainment"] is None:
            continue
        x = 100 * result["attainment"]
        for key, marker in (("accuracy_measured", "o"), ("accuracy_predicted_mean", "x")):
            if result.get(key) is not None:
                ax.scatter(x, 100 * result[key], marker=marker, s=40)
        ax.annotate(policy, (x, 100 * (result.get("accuracy_measured") or result.get("accuracy_predicted_mean") or 0)),
                    fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("SLO attainment, % of frames sent")
    ax.set_ylabel("accuracy, % (o measured on labelled frames, x predicted)")
    ax.set_title(f"{document['scenario']}: accuracy vs attainment", fontsize=9)
    return _save(fig, path)


def _errorbar(ax, rates: list[float], figures: list, scale: float, **style):
    """Medians with min-max bars over repeats; a null (∞: more than the share failed) is left out."""
    points = [(r, median(f), *span(f)) for r, f in zip(rates, figures) if median(f) is not None]
    if not points:
        return ax.plot([], [], **style)[0]
    xs, ys, lows, highs = zip(*points)
    ys = [scale * y for y in ys]
    lows = [y - scale * lo for y, lo in zip(ys, lows)]
    highs = [scale * hi - y if hi != float("inf") else 0.0 for y, hi in zip(ys, highs)]
    return ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, **style).lines[0]


def _rates(document: dict, path: Path) -> Path:
    """Attainment and p50 over every frame sent against the offered arrival rate, one line per policy, with
    min-max bars over repeats."""
    by_policy: dict[str, list[dict]] = {}
    for row in document["rate_sweep"]:
        by_policy.setdefault(row["policy"], []).append(row)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    key = "p50_all_s" if "p50_all_s" in document["rate_sweep"][0] else "p95_s"  # older JSON: p95 over results
    for policy, rows in by_policy.items():
        rows = sorted(rows, key=lambda r: r["arrival_hz"])
        rates = [r["arrival_hz"] for r in rows]
        line = _errorbar(top, rates, [r["attainment"] for r in rows], 100, label=policy)
        _errorbar(bottom, rates, [r[key] for r in rows], 1000, color=line.get_color())
    top.set_ylim(0, 105)
    top.set_ylabel("% of frames sent within the SLO")
    top.legend(fontsize=8)
    bottom.axhline(1000 * document["slo_s"], color="red", lw=1, ls="--")
    bottom.set_yscale("log")
    bottom.set_ylabel("p50 latency, all frames, ms (SLO red)" if key == "p50_all_s" else "p95 latency, ms (SLO red)")
    bottom.set_xlabel("offered arrival rate, mean frames/s over the run (same trace, compressed)")
    top.set_title(f"{document['scenario']}: SLO attainment against arrival rate per policy", fontsize=9)
    return _save(fig, path)
