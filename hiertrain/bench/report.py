"""``hiertrain bench report``: the markdown report that puts the paper's figures beside ours.

Reads what ``bench testbed`` (per model), ``bench edgecores`` and ``bench replan`` wrote into
``--results`` and writes ``REPORT.md`` there, plus the Fig. 6 scatter plot. Only measured
numbers from those files appear; nothing is typed in except the paper's own claims.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Optional

from hiertrain.bench import load, readme

from hiertrain.bench.plot import axes

# The paper's headline claims (section VI-D), to set beside ours.
PAPER = {
    "lenet5": {"all-cloud": 6.9, "all-edge": 1.7, "figs": "Fig. 8 and 10"},
    "alexnet": {"all-cloud": 4.5, "all-edge": 2.3, "figs": "Fig. 7 and 9"},
}
BASELINES = ("all-edge", "all-cloud", "jointdnn", "jointdnn+", "jalad")


def _load(path: Path) -> Optional[dict[str, Any]]:
    return load(path) if path.exists() else None


def _fmt(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def placement(plan: Optional[dict[str, Any]], described: str = "") -> Any:
    """What computes where, ignoring how the plan is written: an O/S/L plan with every sample on o
    and a one-stage chain on the same tier are the same placement. Rows written before the plan
    was recorded in them fall back to the schedule's description."""
    if not plan:
        m = re.search(r"chain (\w+)\[[^\]]*\]$", described) or re.search(r"o=(\w+) .*b_s=0\).*b_l=0\)$", described)
        return ("all", m.group(1)) if m else described.split(": ", 1)[-1]
    stages = (plan.get("plan") or {}).get("stages")
    if stages and len(stages) == 1:
        return ("all", stages[0][0])
    if not stages and plan["b_s"] == 0 and plan["b_l"] == 0:
        return ("all", plan["mapping"]["o"])
    return json.dumps({k: v for k, v in plan.items() if k not in ("policy", "iteration_s", "solve_s", "version",
                                                                  "effective_iteration", "cost_model")}, sort_keys=True)


def testbed_section(r: dict[str, Any], png: str) -> list[str]:
    model, rows = r["model"], r["rows"]
    em, cal = r["emulation"], r.get("calibration", {})
    paper = PAPER.get(model, {})
    out = [f"## {model} (B = {r['batch']}, device-edge {r['bw_device_edge']} Mbit/s) - paper {paper.get('figs', '')}", ""]
    out += [f"Emulation: quotas {em.get('quotas')}, measured speeds device : edge : cloud = "
            f"{' : '.join(str(em['measured_speeds'][t]) for t in ('device', 'edge', 'cloud'))} "
            f"(target {em.get('target_speeds', 'fixed quotas')}); ms per sample {em.get('ms_per_sample')}"
            + (f"; interpreters emulated apart from kernels: {em['interpreter_ratios']} times slower than a core here "
               f"(CPU quotas), kernels dilated {em['dilation']} (`hiertrain/lab/emulation.py` cites both)"
               if em.get("interpreter_ratios") else "") + ".",
            f"Fitted framework overheads (s per iteration): {cal.get('overhead_s')}, from {cal.get('fitted_on', {}).get('measured_s')}; "
            f"message costs (s per message sent or received on the critical path): {cal.get('message_s', 'none (fitted before the message term existed)')}.",
            "", f"![{model}]({png})", ""]
    sweep = [x for x in rows if x["phase"] == "sweep"]
    policies = list(dict.fromkeys(x["policy"] for x in sweep))
    points = sorted({x["bw_edge_cloud"] for x in sweep})
    out += ["Measured s per iteration (calibrated-model prediction in brackets):", "",
            "| edge-cloud Mbit/s | " + " | ".join(policies) + " |", "|---" * (len(policies) + 1) + "|"]
    for bw in points:
        cells = []
        for p in policies:
            row = next((x for x in sweep if x["policy"] == p and x["bw_edge_cloud"] == bw), None)
            cells.append(f"{_fmt(row['measured_s'])} ({_fmt(row.get('predicted_s'))})" if row else "-")
        out.append(f"| {bw} | " + " | ".join(cells) + " |")
    out += ["", "hiertrain's plans:", ""]
    out += [f"- {x['bw_edge_cloud']} Mbit/s: {x['schedule']}" for x in sweep if x["policy"] == "hiertrain"]
    sp = r["summary"]["speedup_of_hiertrain"]
    out += ["", "Speedup of hiertrain (baseline time / hiertrain time, measured):", "",
            "| edge-cloud Mbit/s | " + " | ".join(p for p in policies if p != "hiertrain") + " |",
            "|---" * len(policies) + "|"]
    for bw, d in sp.items():
        out.append(f"| {bw} | " + " | ".join(_fmt(d.get(p), 2) for p in policies if p != "hiertrain") + " |")
    mine = {h["bw_edge_cloud"]: placement(h.get("plan"), h["schedule"]) for h in sweep if h["policy"] == "hiertrain"}
    same = {(x["bw_edge_cloud"], x["policy"]) for x in sweep
            if x["policy"] != "hiertrain" and placement(x.get("plan"), x["schedule"]) == mine.get(x["bw_edge_cloud"])}
    slower = [(bw, p, v) for bw, d in sp.items() for p, v in d.items() if v < 1.0 and (float(bw), p) not in same]
    ties = [v for bw, d in sp.items() for p, v in d.items() if (float(bw), p) in same]
    out += ["", f"Paper: up to {paper.get('all-cloud')}x over All-Cloud and {paper.get('all-edge')}x over All-Edge. "
            f"Ours: {headline(sweep, sp)}.", hybrid_wins(sweep, sp),
            "Points where a baseline with a different placement was faster than hiertrain: "
            + (", ".join(f"{p} at {bw} Mbit/s ({v:.2f})" for bw, p, v in slower) or "none") + ".",
            (f"{len(ties)} baseline runs chose hiertrain's placement (e.g. all on the device, as a chain): their "
             f"ratios, {min(ties):.2f}-{max(ties):.2f}, show the run-to-run spread of identical work on this testbed."
             if ties else ""), ""]
    return out


def _placed(row: dict[str, Any]) -> str:
    """A plan in words: "all on the edge", or "hybrid (...)" when it uses more than one tier."""
    where = placement(row.get("plan"), row["schedule"])
    return f"all on the {where[1]}" if isinstance(where, tuple) else "hybrid (" + row["schedule"].split(": ", 1)[-1] + ")"


def headline(sweep: list[dict[str, Any]], sp: dict[str, dict[str, float]]) -> str:
    """The largest speedup over All-Cloud and over All-Edge, each with the plan that produced it."""
    parts = []
    for p in ("all-cloud", "all-edge"):
        at = [(v, bw) for bw, d in sp.items() for q, v in d.items() if q == p]
        if at:
            v, bw = max(at)
            mine = next(x for x in sweep if x["policy"] == "hiertrain" and str(x["bw_edge_cloud"]) == bw)
            parts.append(f"up to {v:.2f}x over {p} (at {bw} Mbit/s, hiertrain ran {_placed(mine)})")
    return "; ".join(parts)


def hybrid_wins(sweep: list[dict[str, Any]], sp: dict[str, dict[str, float]]) -> str:
    """Where hiertrain's plan split the work over tiers, and what it gained over every single-tier plan."""
    found = []
    for x in sweep:
        if x["policy"] != "hiertrain" or isinstance(placement(x.get("plan"), x["schedule"]), tuple):
            continue
        single = [y["measured_s"] for y in sweep if y["bw_edge_cloud"] == x["bw_edge_cloud"] and y.get("measured_s")
                  and y["policy"] != "hiertrain" and isinstance(placement(y.get("plan"), y["schedule"]), tuple)]
        gain = f"{min(single) / x['measured_s']:.2f}x the best single-tier plan measured" if single else "no single-tier run"
        found.append(f"{x['bw_edge_cloud']} Mbit/s, {_placed(x)}: {gain}")
    return ("Hybrid plans (work on more than one tier) chosen by hiertrain: " + "; ".join(found) + "."
            if found else "hiertrain chose a single-tier plan at every rate here: no hybrid plan was predicted faster.")


def validity_section(results: list[dict[str, Any]], png: str) -> list[str]:
    out = ["## Model validity (paper Fig. 6)", "",
           "Every run not used for fitting, measured against the paper's model (nominal rates) and the "
           "calibrated model (nominal rates; and rates the tiers measured).", "", f"![validity]({png})", "",
           "| model | set | rows | paper model median / max error | calibrated median / max | calibrated, measured rates | framework overhead (measured / network+compute) median, max |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        e0, e1, e2, fo = (s.get(k, {}) for k in ("error_paper", "error", "error_measured_rates", "framework_overhead_ratio"))
        out.append(f"| {r['model']} | all | {e0.get('rows')} | {_fmt(e0.get('median'))} / {_fmt(e0.get('max'))} | "
                   f"{_fmt(e1.get('median'))} / {_fmt(e1.get('max'))} | {_fmt(e2.get('median'))} / {_fmt(e2.get('max'))} | "
                   f"{_fmt(fo.get('median'))}, {_fmt(fo.get('max'))} |")
    out += ["", "Per run (measured vs calibrated model, relative error):", "",
            "| model | policy | Mbit/s | schedule | measured s | paper model s | calibrated s | error |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for x in r["rows"]:
            if x["phase"] == "fit" or not x.get("measured_s"):
                continue
            err = abs(x["measured_s"] - x["predicted_s"]) / x["measured_s"] if x.get("predicted_s") else None
            out.append(f"| {r['model']} | {x['policy']} | {x['bw_edge_cloud']} | {x['schedule'][:70]} | {_fmt(x['measured_s'])} | "
                       f"{_fmt(x['predicted_paper_s'])} | {_fmt(x.get('predicted_s'))} | {_fmt(err, 2)} |")
    return out + [""]


def validity_plot(results: list[dict[str, Any]], path: Path) -> None:
    with axes(path, (4.8, 4.5)) as ax:
        if ax is None:
            return
        lo, hi = 1e9, 0.0
        for r, marker in zip(results, "os^"):
            rows = [x for x in r["rows"] if x["phase"] != "fit" and x.get("measured_s") and x.get("predicted_s")]
            m = [x["measured_s"] for x in rows]
            ax.scatter(m, [x["predicted_paper_s"] for x in rows], marker=marker, facecolors="none", edgecolors="gray",
                       label=f"{r['model']}: paper model")
            ax.scatter(m, [x["predicted_s"] for x in rows], marker=marker, label=f"{r['model']}: calibrated")
            vals = m + [x["predicted_s"] for x in rows] + [x["predicted_paper_s"] for x in rows]
            lo, hi = min([lo, *vals]), max([hi, *vals])
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [0.9 * lo, 0.9 * hi], [1.1 * lo, 1.1 * hi], color="k", alpha=0.08, label="+-10 %")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured s per iteration")
        ax.set_ylabel("predicted s per iteration")
        ax.legend(fontsize=7)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    d = Path(args.results)
    testbeds = [r for r in (_load(p) for p in sorted(d.glob("testbed-*.json"))) if r and "summary" in r]
    lines = ["# hiertrain against the HierTrain paper, on the emulated testbed", "",
             "Generated by `hiertrain bench report` from the JSON beside it (see `scripts/paper.sh` for the "
             "commands that produce them). Three network namespaces joined through the edge by `tc tbf`-shaped "
             "veth links; Mosquitto and the planner in the edge namespace; each tier under a cgroup CPU quota "
             "calibrated to the paper's speed ratios (`hiertrain/emulation.py`). Times are medians of the "
             "interval between consecutive iterations finishing; each schedule's first three iterations (two of them "
             "with fast links while weights move to their new owners) are not measured.", ""]
    if testbeds:
        validity_plot(testbeds, d / "validity.png")
        lines += validity_section(testbeds, "validity.png")
    for r in testbeds:
        lines += testbed_section(r, f"testbed-{r['model']}.png")
    cores = _load(d / "edgecores-alexnet.json")
    if cores:
        lines += ["## Edge server CPU (paper Fig. 11)", "", "![edge cores](edgecores-alexnet.png)", "",
                  "| edge cores | edge-cloud Mbit/s | edge ms/sample | plan | measured s | predicted s |", "|---|---|---|---|---|---|"]
        lines += [f"| {x['edge_cores']} | {x['bw_edge_cloud']} | {x['edge_ms_per_sample']} | {x['schedule'][:80]} | "
                  f"{_fmt(x['measured_s'])} | {_fmt(x['predicted_s'])} |" for x in cores["rows"]]
        lines.append("")
    replans = [(path, rp) for path in sorted(d.glob("replan-*.json")) for rp in [_load(path)] if rp]
    for path, rp in replans:
        lines += replan_section(rp, path.with_suffix(".png").name)
    fam = _load(d / "families.json")
    if fam:
        lines += families_section(fam)
    hub = _load(d / "families-transformers.json")
    if hub:
        lines += families_section(hub)
    energy = _load(d / "energy.json")
    if energy:
        lines += energy_section(energy, "energy.png")
    (d / "REPORT.md").write_text("\n".join(lines) + "\n")
    readme_path = Path(args.readme) if getattr(args, "readme", None) else None
    changed = readme.update(readme_path, d) if readme_path is not None and readme_path.exists() else None
    return {"bench": "report", "path": str(d / "REPORT.md"), "readme_changed": changed, "models": [r["model"] for r in testbeds],
            "edgecores": bool(cores), "replan": bool(replans), "families": bool(fam), "transformers": bool(hub),
            "energy": bool(energy)}


def energy_section(en: dict[str, Any], png: str) -> list[str]:
    """``bench energy``: the fleet testbed's time/energy front and what the energy plans save (pure)."""
    who = ", ".join(f"{d['name']} ({d['power']['name']}, {d['samples']} samples, {d['radio_mbps']:g} Mbit/s)"
                    for d in en["devices"])
    out = ["## Energy on the fleet testbed (`bench energy`)", "", f"![energy]({png})", "",
           f"{en['model']}, devices {who}; device timings {en['device_timings']}; joules from the power model "
           f"(`hiertrain/power.py`), seconds from the cost model"
           + (f", and, marked measured, from `{Path(en['measured_from']).name}`'s runs on the testbed" if en.get("measured_from") else "")
           + ".", "",
           "| medium Mbit/s | front: seconds / devices' joules per step | at EdgeSplit's deadline | at per-device HierTrain's "
           "| budgeted (no device above) | measured: policy seconds / joules |", "|---" * 6 + "|"]
    for r in en["rows"]:
        front = "; ".join(f"{_fmt(p['seconds'])} s / {_fmt(p['devices_j'])} J" for p in r["front"])
        saves = []
        for policy in ("edgesplit", "per-device-hiertrain"):
            s = r["saving_at_equal_deadline"].get(policy)
            saves.append("-" if s is None else f"{_fmt(s['theirs_j'])} -> {_fmt(s['ours']['devices_j'])} J "
                                               f"({s['saving']:.1%} less) within {_fmt(s['deadline_s'])} s")
        b = r.get("budgeted", {})
        budget = b.get("error") or f"{_fmt(b.get('budget_j'))} J: {_fmt(b.get('seconds'))} s, {_fmt(b.get('devices_j'))} J"
        measured = "; ".join(f"{p} {_fmt(v['measured']['seconds'])} s / {_fmt(v['measured']['devices_j'])} J"
                             for p, v in r["policies"].items() if "measured" in v) or "-"
        out.append(f"| {r['medium_mbps']:g} | {front} | {saves[0]} | {saves[1]} | {budget} | {measured} |")
    if any("runs" in r for r in en["rows"]):
        out += ["", "Every plan above *run* on the testbed (`--testbed`: the real runtime over Mosquitto, median "
                "seconds per step after the warm-up; the devices' joules at those seconds). Runs of the same paths "
                "count as one plan at the median of their seconds; the paced plan keeps each device's average watts "
                "(halfway between its idle draw and what it draws in the fastest plan).", "",
                "| medium Mbit/s | runs: measured (predicted) seconds / devices' joules | least joules no slower than "
                "EdgeSplit's run | no slower than per-device HierTrain's | paced plan: pace, measured |", "|---" * 5 + "|"]
        for r in en["rows"]:
            if "runs" not in r:
                continue
            runs = "; ".join(f"{x['label']} {_fmt(x['measured_s'])} ({_fmt(x['predicted_s'])}) s / {_fmt(x['devices_j'])} J"
                             for x in r["runs"])
            saves = []
            for policy in ("edgesplit", "per-device-hiertrain"):
                s = r["measured_saving"].get(policy)
                saves.append("-" if s is None else f"{_fmt(s['theirs_j'])} -> {_fmt(s['ours']['devices_j'])} J "
                                                   f"({s['saving']:.1%} less; {', '.join(s['ours']['labels'])}) "
                                                   f"within {_fmt(s['deadline_s'])} s")
            paced = next(x for x in r["runs"] if x["label"] == "budget_w")
            out.append(f"| {r['medium_mbps']:g} | {runs} | {saves[0]} | {saves[1]} | {_fmt(r['paced']['pace_s'])} s, "
                       f"ran {_fmt(paced['measured_s'])} s |")
    return out + [""]


def families_section(fam: dict[str, Any]) -> list[str]:
    """``bench families``: the architectures users bring, from scratch, BatchNorm in training mode."""
    library = fam.get("library", "written")
    title = ("Hugging Face transformers' own models" if library == "transformers"
             else "The models users bring, written after torchvision's and timm's code")
    out = [f"## {title}, trained from scratch (`bench families --library {library}`)", "",
           f"On {Path(fam['data']).name} ({fam['samples']} samples {fam['shape']}, {fam['classes']} classes; a fifth "
           f"held out), {fam['iterations']} iterations of batch {fam['batch']}, by `hiertrain demo` "
           f"(Mosquitto, profile, planner, three tiers on one machine), each family with its recipe's optimizer. "
           f"BatchNorm in training mode.", "",
           "| family | optimizer | units | cut points | BatchNorm layers | params | accuracy before | after | ms/iteration "
           "| schedules | plan | ops |", "|---" * 12 + "|"]
    for r in fam["rows"]:
        if "error" in r:
            out.append(f"| {r['family']} | not trained: {r['error']} |" + " |" * 10)
            continue
        opt = f"{r['optimizer']} {r['lr']}" if "optimizer" in r else f"sgd {fam.get('lr')}"
        out.append(f"| {r['family']} | {opt} | {r['units']} | {r['cut_points']} | {r['batchnorm_layers']} | {r['params']} | "
                   f"{_fmt(r.get('accuracy_before'))} | {_fmt(r.get('accuracy_after'))} | "
                   f"{_fmt(r.get('ms_per_iteration'), 1)} | {r['schedules']} | {r.get('plan', '-')} | "
                   f"{', '.join(r['ops'])} |")
    return out + [""]


def replan_section(rp: dict[str, Any], png: str) -> list[str]:
    """What ``bench replan`` measured, in words (pure)."""
    link = rp["link"].replace("_", "-")
    lines = [f"## Live re-planning ({rp['model']}, {link} link)", "", f"![replan]({png})", "",
             f"The {link} rate changed {rp['before']} -> {rp['after']} Mbit/s during iteration {rp['drop_iteration']}; "
             f"the first telemetry showing it arrived {rp['first_telemetry_after_drop_s']} s later. The planner "
             f"re-planned {rp['replans']} time(s)."]
    if rp["new_placement_version"] is None:
        lines[-1] += (f" No schedule with a new placement was published: the predicted optimum after the change "
                      f"({rp['optimum_after_plan']}) places the work as before, so there was nothing to move.")
    else:
        measured = rp["optimum_after_measured_s"]
        versus = (f"{rp['settled_over_optimum']} x the best time measured at these rates in the sweep ({measured} s; "
                  f"predicted optimum {rp['optimum_after_predicted_s']} s)" if measured else
                  f"against a predicted optimum of {rp['optimum_after_predicted_s']} s (the sweep did not run these rates)")
        lines[-1] += (f" The schedule with a new placement (v{rp['new_placement_version']}, published for iteration "
                      f"{rp['new_placement_published_for_iteration']}) was in effect from iteration "
                      f"{rp['new_placement_in_effect_at']}, {rp['iterations_from_drop_to_new_placement']} iterations after "
                      f"the drop. Its first iteration took {rp['handover_iteration_s']} s: the model's weights moved to "
                      f"their new owner. Then it settled at {rp['settled_s']} s per iteration, {versus}.")
    lines += ["", "Schedules published:", ""]
    lines += [f"- v{s['version']} from iteration {s['effective_iteration']}: "
              f"{s['policy']} {s['mapping']} b=({s['b_o']}, {s['b_s']}, {s['b_l']}) cuts ({s['m_s']}, {s['m_l']}), "
              f"predicted {_fmt(s['iteration_s'])} s" for s in rp["schedules"]]
    return lines + [""]
