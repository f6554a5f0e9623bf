"""The tables, the summary of the targets and the plot of ``bnrs bench``."""

from __future__ import annotations

from collections.abc import Sequence

from .peaks import Peaks
from .workloads import GBPS, GFLOPS


def _ms(seconds: float) -> str:
    """Milliseconds with about three significant digits."""
    ms = seconds * 1e3
    digits = 0 if ms >= 100 else 1 if ms >= 10 else 2 if ms >= 1 else 3
    return f"{ms:.{digits}f}"


def _timing(stats: dict | None) -> tuple[str, str]:
    if stats is None:
        return "-", ""
    return _ms(stats["median"]), f"{_ms(stats['q1'])}-{_ms(stats['q3'])}"


def _target_text(target: dict) -> str:
    if target["kind"] == "fraction of peak":
        return f">={target['target']:.0%} pk"
    return f">={target['target']:g}x"


def _met_text(target: dict) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[target["met"]]


TABLE_FORMAT = "{:<51} {:>7} {:<13} {:>8} {:<13} {:>10} {:>15} {:>6}  {:<17} {}"


def format_section(section: dict, peaks: Peaks) -> list[str]:
    """The table of one thread count, then samples/s, memory and the profile."""
    threads = section["threads"]
    plural = "s" if threads > 1 else ""
    round_trips = round_trips_text(section.get("core_round_trip_ns"),
                                   section.get("core_round_trip_ns_after"))
    between = f", {round_trips}" if round_trips else ""
    title = (f"== {threads} thread{plural}: peak {peaks.of(GFLOPS, threads):.1f} GFLOP/s "
             f"(FMA, {peaks.fma_gflops_1t:.1f} x {threads}), "
             f"{peaks.of(GBPS, threads):.1f} GB/s (copy){between} ==")
    lines = [title]
    lines.extend(far_apart_note(section.get("core_round_trip_ns"),
                                section.get("core_round_trip_ns_after")))
    lines.append(TABLE_FORMAT.format("work", "bnrs ms", "(IQR)", "torch ms", "(IQR)",
                                     "torch/bnrs", "bnrs rate", "% peak", "target", "met?"))
    for row in section["rows"]:
        bnrs_median, bnrs_iqr = _timing(row["bnrs_s"])
        torch_median, torch_iqr = _timing(row["torch_s"])
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        targets = row["targets"]
        lines.append(TABLE_FORMAT.format(
            row["name"], bnrs_median, f"({bnrs_iqr})", torch_median,
            f"({torch_iqr})" if torch_iqr else "", ratio, f"{row['rate']:.1f} {row['unit']}",
            f"{row['peak_fraction']:.0%}", ", ".join(_target_text(t) for t in targets),
            ", ".join(_met_text(t) for t in targets)).rstrip())
    for row in section["rows"]:
        if row["samples"]:
            text = f"{row['name']}: bnrs {row['samples'] / row['bnrs_s']['median']:,.0f} samples/s"
            if row["torch_s"] is not None:
                text += f", torch {row['samples'] / row['torch_s']['median']:,.0f} samples/s"
            lines.append(text)
    lines.extend(format_memory(section.get("memory")))
    lines.extend(format_profile(section.get("profile")))
    return lines


def format_memory(memory: dict | None) -> list[str]:
    if memory is None:
        return []
    parts, steps = [], memory["bnrs"].get("steps")
    for framework in ("bnrs", "torch"):
        if framework not in memory:
            continue
        entry = memory[framework]
        if "error" in entry:
            parts.append(f"{framework} failed: {entry['error']}")
        else:
            parts.append(f"{framework} {entry['epoch_kib'] / 1024:.1f} MiB "
                         f"(process peak {entry['peak_kib'] / 1024:.0f} MiB)")
    network = f"{memory['network']} " if "network" in memory else ""
    text = (f"peak RSS of {network}training ({steps} steps) above the baseline: "
            + ", ".join(parts))
    if memory["ratio"] is not None:
        target = memory["targets"][0]
        text += (f"; torch/bnrs {memory['ratio']:.2f}x, target bnrs <= torch: "
                 f"{_met_text(target)}")
    return [text]


def format_profile(profile: dict | None) -> list[str]:
    if profile is None:
        return []
    bnrs_profile = profile["bnrs"]
    network = f" of {profile['network']}" if "network" in profile else ""
    title = (f"-- profile: bnrs training step{network} (layers unfused), ms per batch "
             f"(mean of {bnrs_profile['batches']} batches)")
    lines = [title,
             f"   {'layer (input shape)':<40} {'forward':>8} {'backward':>9} {'total':>8}"]
    layer_total = 0.0
    for layer in bnrs_profile["layers"]:
        total = layer["forward_ms"] + layer["backward_ms"]
        layer_total += total
        lines.append(f"   {layer['layer']:<40} {layer['forward_ms']:8.3f} "
                     f"{layer['backward_ms']:9.3f} {total:8.3f}")
    stages = bnrs_profile["stages_ms"]
    step = sum(stages.values())
    lines.append(f"   {'all layers':<40} {'':8} {'':9} {layer_total:8.3f}")
    for stage, ms in stages.items():
        lines.append(f"   stage {stage:<34} {ms:8.3f} ms ({ms / step:.0%} of the step)")
    lines.append(f"   step total {step:.3f} ms; layers {layer_total / step:.0%}, the rest is "
                 "the Python around them")
    torch_profile = profile.get("torch")
    if torch_profile is not None:
        lines.append(f"-- profile: PyTorch training step{network}, top ops by self CPU time, ms per "
                     f"batch (of {torch_profile['self_ms_total']:.3f} ms under the profiler, "
                     f"{torch_profile['batches']} batches)")
        for op in torch_profile["ops"]:
            lines.append(f"   {op['op']:<42} {op['self_ms']:8.3f}  x{op['calls']:<4g} "
                         f"{op['shapes']}")
    return lines


def format_step_profile(profile: dict | None) -> list[str]:
    """The executor's stages at each thread count, and the speed-up of each stage."""
    if profile is None:
        return []
    threads = profile["threads"]
    speedup = len(threads) > 1
    heads = [f"{t}t {part}" for t in threads for part in ("fwd", "bwd")]
    if speedup:
        heads.append("speed-up")
    row = "   {:<44}" + " {:>8}" * len(heads)
    title = (f"-- profile: bnrs training step of {profile['network']} as it runs (fused "
             f"stages, the epoch in one call), ms per step, median of {profile['rounds']} "
             f"epochs of {profile['steps']} steps at each thread count in turn")
    lines = [title, row.format("stage (sample shape in -> out)", *heads)]

    def ratio(first: float, last: float) -> str:
        return f"{first / last:.2f}x" if last > 0 else "-"

    for stage in profile["stages"]:
        values = [f"{ms:.3f}" for pair in zip(stage["forward_ms"], stage["backward_ms"])
                  for ms in pair]
        if speedup:
            total = [f + b for f, b in zip(stage["forward_ms"], stage["backward_ms"])]
            values.append(ratio(total[0], total[-1]))
        lines.append(row.format(stage["stage"], *values))
    for name, key in (("loss (forward and gradient)", "loss_ms"),
                      ("optimizer updates", "update_ms"),
                      ("outside the stages (batches, Python)", "outside_ms"),
                      ("step", "step_ms")):
        ms = profile[key]
        values = [v for m in ms for v in (f"{m:.3f}", "")]
        if speedup:
            values.append(ratio(ms[0], ms[-1]))
        lines.append(row.format(name, *values).rstrip())
    return lines


def round_trips_text(before: float | None, after: float | None) -> str:
    """The cache-line round trip between cores measured before and after a part of the
    run ('' when not measured: one usable CPU)."""
    if before is None or after is None:
        return ""
    return (f"cache-line round trip between cores {before:.0f} ns before, "
            f"{after:.0f} ns after")


#: A cache-line round trip between cores above this (ns) means the two CPUs share no
#: cache: on the 2-vCPU AMD EPYC virtual machine of docs/benchmark.md it was 40-70 ns
#: most of the time, 150-250 ns at times (2-thread times as fast), and 360-530 ns in
#: spells when the 2-thread training epoch ran a third slower.
FAR_APART_NS = 300.0


def far_apart_note(before: float | None, after: float | None) -> list[str]:
    """A note under a part of the run whose round trip between cores, before or after,
    says the two CPUs shared no cache for some of it."""
    slowest = max((t for t in (before, after) if t is not None), default=None)
    if slowest is None or slowest <= FAR_APART_NS:
        return []
    return [f"note: the cores were far apart for some of this part (round trip up to "
            f"{slowest:.0f} ns, against tens of ns between cores that share a cache): "
            "times with more than one thread ran slow"]


def format_scaling(rows: Sequence[dict],
                   round_trips: Sequence[float | None] = (None, None)) -> list[str]:
    if not rows:
        return []
    row_format = "{:<51} {:>7} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7} {}"
    where = ("bnrs in a process without PyTorch, PyTorch alone"
             if any(row.get("bnrs_process") == "child" for row in rows) else "each alone")
    between = round_trips_text(*round_trips)
    title = ("== speed-up over 1 thread (1 and n threads interleaved in one measurement; "
             f"{where}; cores = CPU time / wall time of bnrs at n threads, what the machine "
             "gave it)" + (f"; {between}" if between else "") + " ==")
    lines = [title, *far_apart_note(*round_trips),
             row_format.format("work", "threads", "bnrs 1t ms", "bnrs nt ms", "cores", "bnrs",
                               "torch", "target", "met?")]
    for row in rows:
        target = row["targets"][0]
        torch_text = "-" if row["torch_speedup"] is None else f"{row['torch_speedup']:.2f}x"
        lines.append(row_format.format(
            row["name"], row["threads"], _ms(row["bnrs_1t_s"]["median"]),
            _ms(row["bnrs_s"]["median"]), f"{row['cores'][1]:.2f}",
            f"{row['bnrs_speedup']:.2f}x", torch_text,
            f">={target['target']:g}x", _met_text(target)))
    return lines


def format_peers(peers: dict) -> list[str]:
    """One table of the peers: each ratio from the process that ran that peer."""
    if not peers:
        return []
    row_format = "{:<12} {:>7} {:<56} {:>8} {:<15} {:>8} {:<15} {:>9} {}"
    title = ("== peers: bnrs and each peer interleaved in a process of their own (one per "
             "peer, network and thread count); ratio = peer time / bnrs time (above 1: bnrs is "
             "faster) ==")
    lines = [title,
             row_format.format("peer", "threads", "work", "bnrs ms", "(IQR)", "peer ms",
                               "(IQR)", "peer/bnrs", "cores bnrs, peer")]
    notes = []
    for framework, peer in peers.items():
        for run in peer["runs"]:
            if "error" in run:
                network = f" {run['network']}" if "network" in run else ""
                lines.append(f"{framework:<12} {run['threads']:>7}{network} failed: "
                             f"{run['error']}")
                continue
            for row in run["rows"]:
                bnrs_median, bnrs_iqr = _timing(row["bnrs_s"])
                peer_median, peer_iqr = _timing(row["peer_s"])
                lines.append(row_format.format(
                    framework, run["threads"], row["name"], bnrs_median, f"({bnrs_iqr})",
                    peer_median, f"({peer_iqr})", f"{row['ratio']:.2f}x",
                    ", ".join(f"{c:.2f}" for c in row["cores"])).rstrip())
            versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
            note = f"  {framework} ({versions}; {peer['python']}): {run['thread_settings']}"
            if note not in notes:
                notes.append(note)
    return lines + notes


def all_targets(sections: Sequence[dict], scaling: Sequence[dict]) -> list[dict]:
    """Every target with the work and thread count it belongs to."""
    targets = []
    for section in sections:
        for row in section["rows"]:
            targets += [{"work": row["name"], "threads": section["threads"], **t}
                        for t in row["targets"]]
        if section.get("memory"):
            targets += [{"work": "peak RSS of a training epoch", "threads": section["threads"],
                         **t} for t in section["memory"]["targets"]]
    for row in scaling:
        targets += [{"work": row["name"], "threads": row["threads"], **t}
                    for t in row["targets"]]
    return targets


def format_summary(targets: Sequence[dict]) -> list[str]:
    measured = [t for t in targets if t["met"] is not None]
    met = sum(t["met"] for t in measured)
    lines = [f"== targets: {met} of {len(measured)} met"
             + (f" ({len(targets) - len(measured)} not measured without PyTorch)"
                if len(measured) < len(targets) else "") + " =="]
    for target in targets:
        value, goal = target["measured"], target["target"]
        if target["kind"] == "fraction of peak":
            text = "n/a" if value is None else f"{value:.0%}"
            goal_text = f"{goal:.0%}"
        else:
            text = "n/a" if value is None else f"{value:.2f}x"
            goal_text = f"{goal:g}x"
        status = {True: "met ", False: "MISS", None: "n/a "}[target["met"]]
        lines.append(f"  {status} {target['work']}, {target['threads']}t: {target['kind']} "
                     f"{text} (target >= {goal_text})")
    return lines


def plot_results(result: dict, path: str) -> None:
    """Bars of each item's speed ratio per thread count, with its target; % of peak when
    PyTorch was missing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have_ratios = result["torch_available"]
    sections = result["sections"]
    names = [row["name"] for row in sections[0]["rows"]]
    height = 0.8 / len(sections)
    figure, axes = plt.subplots(figsize=(10, 0.35 * len(names) * len(sections) + 1.5))
    for offset, section in enumerate(sections):
        values = [row["ratio"] if have_ratios else row["peak_fraction"] * 100
                  for row in section["rows"]]
        positions = [i + offset * height for i in range(len(names))]
        axes.barh(positions, values, height, label=f"{section['threads']} thread(s)")
    for i, row in enumerate(sections[0]["rows"]):
        for target in row["targets"]:
            if have_ratios and target["kind"] == "speed ratio torch/bnrs":
                axes.plot([target["target"]] * 2, [i - 0.1, i + 0.8 - 0.1], color="black")
    if have_ratios:
        axes.axvline(1.0, color="grey", linestyle=":")
        axes.set_xscale("log")
        axes.set_xlabel("speed ratio torch time / bnrs time (black: target)")
    else:
        axes.set_xlabel("bnrs rate, % of the measured peak (no PyTorch to compare)")
    axes.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=7)
    axes.invert_yaxis()
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
