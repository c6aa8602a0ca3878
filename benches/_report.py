"""Targets, the Markdown table and the PNG plots of compare_eager_vs_graph.py's results JSON."""
from __future__ import annotations

import json
import os

VARIANT_LABELS = {
    "zoo_eager": "zoo eager",
    "zoo_compiled": "zoo compiled",
    "zoo_compiled_int8": "zoo compiled, int8 weights",
    "zoo_compiled_int4": "zoo compiled, int4 weights",
    "zoo_aoti": "zoo AOTI export",
    "hf_eager": "transformers eager",
    "hf_compiled": "transformers compiled (static cache)",
    "llamacpp_bf16": "llama.cpp bf16",
    "llamacpp_q8_0": "llama.cpp q8_0",
    "llamacpp_q4_0": "llama.cpp q4_0",
}
VARIANT_ORDER = list(VARIANT_LABELS)


def label(variant: str) -> str:
    return VARIANT_LABELS.get(variant, variant)


def _med(stats: dict | None) -> float | None:
    return None if not stats else stats["median"]


def _group_title(g: dict) -> str:
    return f"{g['model']} {g['dtype']}"


# ---- targets ------------------------------------------------------------------------------------
def evaluate_targets(results: dict) -> list[dict]:
    """The issue's four targets, each met / missed / not measured (met None), with the numbers."""
    groups = results["groups"]
    targets = []

    # 1. tiny model, batch 1: zoo compiled TPOT <= 0.5 x transformers' compiled recipe
    t = {"id": "tiny_tpot_vs_hf_compiled", "target": "zoo compiled time per output token <= 0.5x transformers' "
         "best compiled recipe (tiny model, batch 1)", "met": None, "measured": None}
    for g in groups:
        if g["kind"] == "tiny" and g["model"] == "tiny-llama":
            z = _med(g["tpot_ms"].get("1", {}).get("zoo_compiled"))
            h = _med(g["tpot_ms"].get("1", {}).get("hf_compiled"))
            if z and h:
                t.update(measured=f"{z:.3f} ms vs {h:.3f} ms = {z / h:.2f}x", ratio=z / h, met=z / h <= 0.5)
            break
    targets.append(t)

    # 2. medium bf16, batch 1: >= 85% of the measured memory bandwidth
    t = {"id": "medium_bf16_bandwidth", "target": ">= 85% of measured memory bandwidth, zoo compiled, medium "
         "model bf16, batch 1", "met": None, "measured": None}
    for g in groups:
        if g["kind"] == "medium" and g["dtype"] == "bfloat16":
            bw = g.get("bandwidth", {}).get("zoo_compiled")
            if bw and bw.get("fraction") is not None:
                extra = (f" (median probe {bw['median_probe_gbs']:.1f} GB/s: {100 * bw['fraction_of_median_probe']:.0f}%)"
                         if bw.get("median_probe_gbs") else "")
                t.update(measured=f"{bw['achieved_gbs']:.1f} GB/s of {bw['roofline_gbs']:.1f} GB/s (best probe) = "
                                  f"{100 * bw['fraction']:.0f}%{extra}", fraction=bw["fraction"],
                         met=bw["fraction"] >= 0.85)
    targets.append(t)

    # 3. zoo compiled >= zoo eager (tokens/s) at every batch size measured, every model
    rows, all_met, any_measured = [], True, False
    for g in groups:
        for B, per in sorted(g["tpot_ms"].items(), key=lambda kv: int(kv[0])):
            c, e = _med(per.get("zoo_compiled")), _med(per.get("zoo_eager"))
            if c and e:
                any_measured = True
                ok = c <= e
                all_met &= ok
                rows.append(f"{_group_title(g)} B{B}: {e / c:.2f}x" + ("" if ok else " (slower)"))
    targets.append({"id": "compiled_ge_eager", "target": "zoo compiled >= zoo eager at every batch size measured "
                    "(decode tokens/s)", "met": all_met if any_measured else None,
                    "measured": "; ".join(rows) if rows else None})

    # 4. warm start >= 5x faster than cold
    t = {"id": "warm_start_5x", "target": "zoo warm start >= 5x faster than cold (new process, zoo.load -> first "
         "token)", "met": None, "measured": None}
    for ws in results.get("warm_start", []):
        if ws["variant"] == "zoo_compiled" and ws.get("speedup"):
            t.update(measured=f"{ws['model']} {ws['dtype']}: cold {ws['cold_s']:.1f} s, warm {ws['warm_s']:.1f} s "
                              f"= {ws['speedup']:.1f}x", speedup=ws["speedup"], met=ws["speedup"] >= 5)
            break
    targets.append(t)
    return targets


# ---- Markdown -----------------------------------------------------------------------------------
def _fmt(stats: dict | None, digits: int = 2) -> str:
    if not stats:
        return "–"
    m, p = stats["median"], stats["p90"]
    fmt = f"{{:.{digits}f}}"
    return f"{fmt.format(m)} ({fmt.format(p)})"


def _num(x, digits=1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _digits(values: list[float | None]) -> int:
    vs = [v for v in values if v]
    if not vs:
        return 2
    m = min(vs)
    return 3 if m < 1 else 2 if m < 10 else 1 if m < 1000 else 0


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# zoo CPU benchmark: eager vs graph vs transformers ({results['created'][:10]})", ""]
    lines.append(f"`{results['command']}` ({results['mode']} mode, {results['config']['repetitions']} interleaved "
                 f"repetitions per case; each cell is the **median (p90)**)")
    lines.append("")
    lines.append(f"- CPU: {env['cpu_model']} ({env['cpu_count']} cores, {env['threads']} threads, "
                 f"{', '.join(env['cpu_flags'])}), {env['mem_total_gib']} GiB RAM; device {env['device']}")
    lines.append(f"- torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}, zoo "
                 f"{env['zoo']} (git {env.get('git')})")
    busy = results.get("machine", {})
    if busy.get("foreign_share") is not None:
        lines.append(f"- other processes used {100 * busy['foreign_share']:.0f}% of the machine's CPU time during "
                     f"the run ({busy['foreign_cpu_s']:.0f} CPU-s over {busy['wall_s']:.0f} s; load average "
                     f"{busy['loadavg_start'][0]:.2f} at start, {busy['loadavg_end'][0]:.2f} at end)"
                     + (": **the machine was busy**, treat small differences as noise"
                        if busy["foreign_share"] > 0.05 else ": the machine was quiet"))
    lines.append("")

    bws = results["bandwidth"]
    lines += ["## Memory bandwidth (measured in this run, all threads, best of N)", "",
              "| when | fp32 sum (read) | bf16 sum (read) | copy (read + write) | roofline used |",
              "| --- | --- | --- | --- | --- |"]
    for bw in bws:
        lines.append(f"| {bw['when']} | {bw['sum_fp32_gbs']:.1f} GB/s | {bw['sum_bf16_gbs']:.1f} GB/s | "
                     f"{bw['copy_gbs']:.1f} GB/s | {bw['read_gbs']:.1f} GB/s |")
    for g in results["groups"]:
        pr = g.get("probe_read_gbs")
        if pr:
            lines.append(f"| during {_group_title(g)} ({pr['n']} read probes, median / best) | | | | "
                         f"{pr['median']:.1f} / {pr['max']:.1f} GB/s |")
    lines.append("")
    lines.append("A group's roofline is the best read bandwidth probed at the start of the run, just before the "
                 "group and before each of its repetitions.")
    lines.append("")

    for g in results["groups"]:
        w = g["weights"]
        lines.append(f"## {_group_title(g)}")
        lines.append("")
        lines.append(f"{w['parameters'] / 1e6:.1f} M parameters; {w['streamed_bytes'] / 1e9:.3f} GB of weights "
                     f"streamed per decode step; roofline {g['roofline_gbs']:.1f} GB/s; KV cache {g['max_batch_size']} slots x {g['max_seq_len']} "
                     f"positions; {g['new_tokens']} new tokens per decode case, prompts of {g['decode_prompt_len']} "
                     f"tokens. Times in ms, tokens/s = batch / TPOT (decode throughput, all sequences).")
        for note in g.get("notes", []):
            lines.append(f"- {note}")
        fs = g.get("foreign_share")
        if fs:
            lines.append(f"- other processes used {100 * fs['median']:.0f}% of the CPUs during the median sample "
                         f"(p90 {100 * fs['p90']:.0f}%); {g.get('retried_samples', 0)} of {len(g['samples'])} samples "
                         "were retried" + (": **contended, the millisecond-scale numbers are noise-dominated**"
                                           if fs["median"] > 0.1 else ""))
        lines.append("")
        Ls = sorted(g["ttft_ms"], key=int)
        Bs = sorted(g["tpot_ms"], key=int)
        variants = [v for v in VARIANT_ORDER if v in g["variants"]]
        head = (["variant"] + [f"TTFT {L}" for L in Ls] + [f"TPOT B{B}" for B in Bs] + [f"tok/s B{B}" for B in Bs]
                + ["B1 bandwidth", "compile / warm-up", "peak RSS"])
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + " --- |" * len(head))
        for v in variants:
            info = g["variants"][v]
            if info.get("error") and not any(g["tpot_ms"][B].get(v) for B in Bs):
                lines.append(f"| {label(v)} | " + " | ".join(["–"] * (len(head) - 2)) + f" | failed: {info['error'][:80]} |")
                continue
            row = [label(v)]
            row += [_fmt(g["ttft_ms"][L].get(v), _digits([_med(g["ttft_ms"][L].get(v))])) for L in Ls]
            row += [_fmt(g["tpot_ms"][B].get(v), _digits([_med(g["tpot_ms"][B].get(v))])) for B in Bs]
            row += [_fmt(g["decode_tok_s"][B].get(v), 1) for B in Bs]
            bw = g.get("bandwidth", {}).get(v)
            if bw and bw.get("fraction_of_median_probe") is not None:
                row.append(f"{bw['achieved_gbs']:.1f} GB/s ({100 * bw['fraction']:.0f}% of best, "
                           f"{100 * bw['fraction_of_median_probe']:.0f}% of median probe)")
            else:
                row.append(f"{bw['achieved_gbs']:.1f} GB/s ({100 * bw['fraction']:.0f}%)" if bw else "–")
            comp = info.get("compile_s")
            status = info.get("graph_cache")
            row.append("–" if not comp else f"{comp:.1f} s" + (f" ({status} cache)" if status else ""))
            row.append(f"{info['peak_rss_mib']:.0f} MiB" if info.get("peak_rss_mib") else "–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        ratios = []
        for B in Bs:
            per = g["tpot_ms"][B]
            z, ze, h = _med(per.get("zoo_compiled")), _med(per.get("zoo_eager")), _med(per.get("hf_compiled"))
            he = _med(per.get("hf_eager"))
            parts = []
            if z and ze:
                parts.append(f"compiled/eager speed-up {ze / z:.2f}x")
            if z and h:
                parts.append(f"zoo compiled TPOT = {z / h:.2f}x transformers compiled")
            if z and he:
                parts.append(f"{he / z:.2f}x faster than transformers eager")
            for mode in ("int8", "int4"):
                zq = _med(per.get(f"zoo_compiled_{mode}"))
                if z and zq:
                    parts.append(f"{mode} TPOT = {zq / z:.2f}x zoo compiled")
            for ours, peer in (("zoo_compiled", "llamacpp_bf16"), ("zoo_compiled_int8", "llamacpp_q8_0"),
                               ("zoo_compiled_int4", "llamacpp_q4_0")):
                a, b = _med(per.get(ours)), _med(per.get(peer))
                if a and b:
                    parts.append(f"{label(ours)} TPOT = {a / b:.2f}x {label(peer)}")
            if parts:
                ratios.append(f"- B{B}: " + ", ".join(parts))
        if g.get("tokens_match"):
            ratios.append("- greedy tokens equal to transformers eager (batch 1 decode): " + ", ".join(
                f"{label(v)} {100 * f:.0f}%" for v, f in g["tokens_match"].items()))
        if ratios:
            lines += ratios + [""]

    ws = results.get("warm_start", [])
    if ws:
        lines += ["## Start-up: new process, load -> first token", "",
                  "Each probe is a fresh `python` process; the time runs from the load call (zoo.load /"
                  " from_pretrained; the library is imported just before) to the first generated token. Cold = empty "
                  "graph cache and inductor cache (temporary dirs); warm = the same dirs, filled by the cold run. The "
                  "process wall columns time the whole process instead (python, torch and library imports, load, "
                  "two tokens, exit).", "",
                  "| model | variant | cold (s) | warm (s, median) | speed-up | warm: second token (s) "
                  "| process wall cold / warm (s) | process speed-up |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for w in ws:
            walls = (f"{_num(w.get('cold_process_wall_s'))} / {_num(w.get('warm_process_wall_s'))}"
                     if w.get("cold_process_wall_s") else _num(w.get("warm_process_wall_s")))
            ps = w.get("process_speedup")
            lines.append(f"| {w['model']} {w['dtype']} | {label(w['variant'])} | {_num(w.get('cold_s'))} | "
                         f"{_num(w.get('warm_s'), 2)} | {_num(w.get('speedup'))}{'x' if w.get('speedup') else ''} | "
                         f"{_num(w.get('warm_second_token_s'), 2)} | {walls} | {_num(ps)}{'x' if ps else ''} |")
        notes = [w["note"] for w in ws if w.get("note")]
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])

    lines += ["## Targets", "", "| target | measured | verdict |", "| --- | --- | --- |"]
    for t in results.get("targets", []):
        verdict = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**missed**")
        lines.append(f"| {t['target']} | {t['measured'] or '–'} | {verdict} |")
    lines.append("")
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------------
def plots(results: dict, out_dir: str, stem: str) -> list[str]:
    """PNG plots next to the JSON; returns their paths ([] when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    groups = results["groups"]
    colors = {"zoo_eager": "tab:blue", "zoo_compiled": "tab:orange", "zoo_compiled_int8": "tab:olive",
              "zoo_compiled_int4": "tab:cyan", "zoo_aoti": "tab:purple", "hf_eager": "tab:green",
              "hf_compiled": "tab:red", "llamacpp_bf16": "tab:brown", "llamacpp_q8_0": "tab:pink",
              "llamacpp_q4_0": "tab:gray"}
    assert set(colors) == set(VARIANT_ORDER), "every variant needs a plot colour"

    def curve(ax, table: dict, xlabel: str, ylabel: str, title: str, log: bool = True):
        xs = sorted(table, key=int)
        for v in VARIANT_ORDER:
            pts = [(int(x), table[x][v]) for x in xs if table[x].get(v)]
            if not pts:
                continue
            X = [p[0] for p in pts]
            M = [p[1]["median"] for p in pts]
            P = [p[1]["p90"] - p[1]["median"] for p in pts]
            ax.errorbar(X, M, yerr=[[0] * len(P), P], marker="o", capsize=3, label=label(v), color=colors.get(v))
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xticks([int(x) for x in xs])
        ax.set_xticklabels(xs)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)

    for key, xlabel, ylabel, name in (("tpot_ms", "batch size", "time per output token (ms, median, bar to p90)",
                                       "tpot"),
                                      ("ttft_ms", "prompt length (tokens)", "time to first token (ms, median, bar to p90)",
                                       "ttft"),
                                      ("decode_tok_s", "batch size", "decode tokens/s (all sequences)", "throughput")):
        gs = [g for g in groups if g[key]]
        if not gs:
            continue
        fig, axes = plt.subplots(1, len(gs), figsize=(4.6 * len(gs), 4.2), squeeze=False)
        for ax, g in zip(axes[0], gs):
            curve(ax, g[key], xlabel, ylabel if ax is axes[0][0] else "", _group_title(g))
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        path = os.path.join(out_dir, f"{stem}-{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    # roofline: achieved bandwidth at batch 1 vs the measured machine bandwidth
    gs = [g for g in groups if g.get("bandwidth")]
    # the tiny models' weights (a few MB) live in cache: their "bandwidth" is no roofline point
    gs = [g for g in gs if g["kind"] != "tiny"] or gs
    if gs:
        fig, axes = plt.subplots(1, len(gs), figsize=(4.0 * len(gs), 4.2), squeeze=False)
        for ax, g in zip(axes[0], gs):
            vs = [v for v in VARIANT_ORDER if v in g["bandwidth"]]
            vals = [g["bandwidth"][v]["achieved_gbs"] for v in vs]
            roof = next(iter(g["bandwidth"].values()))["roofline_gbs"]
            ax.bar(range(len(vs)), vals, color=[colors.get(v) for v in vs])
            ax.axhline(roof, color="black", linestyle="--", linewidth=1)
            ax.axhline(0.85 * roof, color="gray", linestyle=":", linewidth=1)
            med = next(iter(g["bandwidth"].values())).get("median_probe_gbs")
            if med:
                ax.axhline(med, color="tab:gray", linestyle="-.", linewidth=1)
                ax.text(-0.4, med, f"median probe {med:.1f}", va="bottom", ha="left", fontsize=7)
            ax.text(len(vs) - 0.5, roof, f" measured {roof:.1f} GB/s", va="bottom", ha="right", fontsize=8)
            for i, (v, val) in enumerate(zip(vs, vals)):
                ax.text(i, val, f"{100 * g['bandwidth'][v]['fraction']:.0f}%", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(vs)))
            ax.set_xticklabels([label(v).replace(" (static cache)", "\n(static cache)").replace("transformers",
                                                                                                  "HF") for v in vs],
                               rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("weight bytes/token x tokens/s (GB/s)" if ax is axes[0][0] else "")
            ax.set_title(f"{_group_title(g)}, batch 1", fontsize=10)
            ax.set_ylim(0, max(vals + [roof]) * 1.15)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-roofline.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    ws = [w for w in results.get("warm_start", []) if w.get("warm_s")]
    if ws:
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(ws)), 4.2))
        names = [f"{w['model']}\n{label(w['variant']).replace('transformers', 'HF')}" for w in ws]
        xs = range(len(ws))
        ax.bar([x - 0.2 for x in xs], [w.get("cold_s") or 0 for w in ws], width=0.4, label="cold", color="tab:gray")
        ax.bar([x + 0.2 for x in xs], [w["warm_s"] for w in ws], width=0.4, label="warm", color="tab:blue")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylabel("load -> first token in a new process (s)")
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-startup.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_all(results: dict, out_dir: str, stem: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    results["targets"] = evaluate_targets(results)
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "markdown": os.path.join(out_dir, f"{stem}.md")}
    results["plots"] = [os.path.basename(p) for p in plots(results, out_dir, stem)]
    md = markdown(results)
    if results["plots"]:
        md += "\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in results["plots"]) + "\n"
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(md)
    results["outputs"] = {k: os.path.basename(v) for k, v in paths.items()}
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, paths["json"])
    paths["plots"] = [os.path.join(out_dir, p) for p in results["plots"]]
    return paths


def emit(text: str, out: str | None) -> None:
    """Print a bench's Markdown report, and write it to `out` when given."""
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
