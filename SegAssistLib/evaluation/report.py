"""The benchmark report: ``report.md`` with tables, ``per_case.md``, PNG plots and a gallery.

Rendered from the JSON result of :func:`SegAssistLib.evaluation.bench.run_bench` alone, except the
gallery, whose masks are recomputed by replaying each pictured session's recorded prompts through
a fresh session of the same engine (every engine here is deterministic for the same prompts).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from SegAssistLib.engine.base import Engine
from SegAssistLib.evaluation import plots
from SegAssistLib.evaluation.aggregate import NOC_KEYS, Summary, dataset_means, group_by, ordered, summarise
from SegAssistLib.evaluation.gallery import gallery_title, pick_best_median_worst, render_case
from SegAssistLib.evaluation.metrics import CONVENTIONS
from SegAssistLib.evaluation.runner import PROTOCOLS
from SegAssistLib.evaluation.selection import SPECS
from SegAssistLib.evaluation.stats import CONFIDENCE, N_RESAMPLES, Estimate
from SegAssistLib.files import atomic_write_many
from SegAssistLib.prompts import parse_prompt

REPORT_NAME = "report.md"
PER_CASE_NAME = "per_case.md"
PICTURE_FOLDERS = ("plots", "gallery")
_PICTURE_LINK = re.compile(r"\]\(((?:plots|gallery)/[^)/\s]+\.png)\)")
BASELINES = ("growcut", "randomwalker")
ENGINE_ORDER = ("builtin", "ablation", "growcut", "randomwalker")
PROTOCOL_TEXT = {
    "clicks": "clicks only",
    "box+clicks": "box, then clicks (CVPR 2025 challenge)",
    "scribble+clicks": "scribble, then clicks",
}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _f(x: Optional[float], digits: int = 3) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _noc(s: Summary, key: str) -> str:
    return f"{s.noc[key].mean:.1f} ({s.reached[key]:.0%})"


def _latency(s: Summary) -> str:
    med, p95 = s.latency["median_s"], s.latency["p95_s"]
    return "–" if med is None else f"{med:.2f} / {p95:.2f}"


def _hd(s: Summary) -> str:
    text = s.final_hd95.format(1)
    return text + (f" ({s.hd95_empty} empty)" if s.hd95_empty else "")


def linked_pictures(out: Path) -> List[Path]:
    """The pictures in ``out``'s ``plots/`` and ``gallery/`` that the report.md there links: an earlier
    run's, which a new report replaces; any other picture there is someone else's and is kept."""
    try:
        text = (Path(out) / REPORT_NAME).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [Path(out) / name for name in dict.fromkeys(_PICTURE_LINK.findall(text))]


class Report:
    """``progress``: called with a line before each slow part (a plot, a gallery session replayed);
    ``overwrite``: an existing report.md or per_case.md is replaced (else FileExistsError, also for one
    that appeared while the report was made)."""

    def __init__(self, result: Dict, out: Path, engines: Optional[Dict[str, Engine]] = None,
                 progress: Optional[Callable[[str], None]] = None, overwrite: bool = True):
        self.result = result
        self.overwrite = overwrite
        self.out = Path(out)
        self.engines = engines or {}
        self.progress = progress or (lambda line: None)
        self.records: List[Dict] = result["records"]
        self.config = result["config"]
        self.seed = int(self.config.get("seed", 0))
        self.engine_names = ordered((r["engine"] for r in self.records), ENGINE_ORDER) or list(self.config["engines"])
        self.protocols = ordered((r["protocol"] for r in self.records), PROTOCOLS)
        # the protocols that ran (the records' alone would leave out one whose sessions were all skipped)
        self.protocols_run = ordered(list(self.config.get("protocols") or []) + self.protocols, PROTOCOLS)
        self.datasets = list(dict.fromkeys(r["dataset"] for r in self.records))
        self.lines: List[str] = []

    def summary(self, **where) -> Optional[Summary]:
        chosen = [r for r in self.records if all(r.get(k) == v for k, v in where.items())]
        return summarise(chosen, self.seed)

    # --- sections ------------------------------------------------------------------------------
    def header(self) -> None:
        m, c = self.result.get("machine", {}), self.config
        caps = c.get("engine_capabilities", {})
        model = caps.get("builtin") or caps.get("ablation")
        gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
        self.lines += [
            "# SegAssist benchmark" + (" (quick subset)" if c.get("quick") else ""),
            "",
            f"Run {self.result.get('started', '?')} in {self.result.get('wall_s', 0) / 60:.1f} min on "
            f"{m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores, {m.get('memory_gib', '?')} GiB{gpu}), "
            f"{m.get('platform', '?')}; Python {m.get('python', '?')}, torch {m.get('torch', '–')} "
            f"({m.get('torch_threads', '–')} threads), device `{m.get('device', 'cpu')}`, commit "
            f"`{m.get('commit', '?')}`.",
            "",
        ]
        if model:
            self.lines += [f"Model: {model['name']} {model['version']} ({c.get('model') or 'shipped weights'}).", ""]
        if c.get("command"):
            self.lines += ["Command:", "", f"    {c['command']}", ""]
        if self.result.get("interrupted"):
            self.lines += [f"**Partial results**: the run was {self.result['interrupted']}; the tables hold the "
                           "sessions finished before it.", ""]

    def protocol_text(self) -> str:
        """The protocols that ran, each with its clicks, and the click rule."""
        c = self.config
        phrases = {
            "clicks": f"clicks only ({c['clicks']} clicks)",
            "box+clicks": f"a box (the structure's 3D bounding box) then {c['refine_clicks']} clicks, as in the "
                          "CVPR 2025 interactive 3D segmentation challenge",
            "scribble+clicks": f"a scribble then {c['refine_clicks']} clicks",
        }
        kinds = (("box+clicks", "box"), ("scribble+clicks", "scribble"), ("clicks", "first click"))
        firsts = [first for protocol, first in kinds if protocol in self.protocols_run]
        same = firsts[0] if len(firsts) == 1 else ", ".join(firsts[:-1]) + " and " + firsts[-1]
        return (
            f"- **Protocol{'s' if len(self.protocols_run) > 1 else ''}** (every engine gets the same {same}, and "
            f"every later click by the same rule from its own mask): "
            f"{'; '.join(phrases.get(p, p) for p in self.protocols_run)}. "
            "Each click goes to the most interior voxel (distance in mm) of the largest 6-connected error region "
            "(positive in a miss, negative in a spill), computed from the engine's own current mask; a first "
            "click follows the rule with nothing predicted yet, so it goes to the most interior voxel of the "
            "structure's largest connected piece. The challenge's own click rule differs in details (one error "
            "mask, 26-connectivity, voxel units, random ties), so its numbers and these are close but not "
            "identical."
        )

    def method(self) -> None:
        c = self.config
        rw = c.get("randomwalker_max_voxels")
        box = "box+clicks" in self.protocols_run
        engines = {
            "builtin": "the SegAssist model with its full prompt history",
            "ablation": "the same model without prompt history: each interaction alone, in a fresh session with "
            "the current mask as its initial mask prompt (earlier clicks, box and scribble are forgotten; the "
            "mask is kept). Its latency includes opening that session",
            "growcut": "3D Slicer's Grow from seeds (`vtkImageGrowCutSegment`); clicks and scribbles become seed "
            "balls, background on a shell 30 mm around the object seeds (without the ground truth)"
            + (", or one voxel outside the box when there is one, none where the box meets the image edge (a box "
               "alone paints no object seed: Dice 0 at the box step)" if box else ""),
            "randomwalker": "scikit-image's random walker with the same seeds, in the same region as Grow from "
            "seeds" + (f"; run only on images of at most {rw:,} voxels, so it is absent where the image is larger"
                       if rw else " (it needs ~10 s per click on the 2.3 M-voxel left-atrium images on 2 CPU cores)"),
        }
        self.lines += ["## How it was measured", "", self.protocol_text()]
        if "scribble+clicks" in self.protocols_run:
            self.lines += [
                "- **Scribbles** are drawn on a slice through the structure: axial, coronal, sagittal and oblique "
                "(35° tilt) in turn over the structures of a dataset, along the skeleton or just inside the outline "
                f"(alternating every four), with {c.get('scribble_jitter_mm', 0)} mm of smooth hand jitter that "
                "never leaves the structure.",
            ]
        self.lines += [f"- **{e}**: {engines.get(e, e)}." for e in self.engine_names]
        self.lines += [
            "- **Metrics** after every interaction: Dice and HD95 (mm, 95th percentile of the symmetric "
            "surface distances using the voxel spacing). NoC@t: interactions (box or scribble included) until "
            "Dice ≥ t; when never reached it counts as the number allowed (the clicks, plus one after a box or "
            "scribble), and the percentage reached is given in brackets. Dice AUC: the challenge's area under "
            "the Dice curve over the clicks after the box (trapezoid, unit steps, 0 to 4 with 5 clicks); "
            "*AUC norm* divides it by its maximum. Latency: the engine's wall-clock time per interaction "
            "(median / 95th percentile). Memory: the process's peak resident set size during a session.",
            f"- **Uncertainty**: means with a {CONFIDENCE:.0%} percentile bootstrap interval ({N_RESAMPLES} "
            f"resamples of patients, seed {self.seed}: all structures and cases of one patient, such as "
            "ACDC's two frames or Sunnybrook's two phases, are drawn together), written `mean [low, high]`. "
            "*sessions (patients)* counts the sessions and the patients they come from. HD95 means leave out "
            "sessions that ended with an empty mask (counted as *empty*).",
            "",
        ]

    def selection(self) -> None:
        self.lines += ["## Cases", "", "The engine's evaluation split (`Resources/splits.json`), never used in "
                       "training; the first cases of each dataset in sorted order.", ""]
        rows = []
        for d in self.config.get("cases", {}):
            mine = [r for r in self.records if r["dataset"] == d]
            structures = ", ".join(dict.fromkeys(r["structure"] for r in mine)) or "–"
            note = SPECS[d].note if d in SPECS else ""
            rows.append([d, ", ".join(self.config["cases"][d]), structures, note])
        self.lines += _table(["dataset", "cases", "structures", "notes"], rows)
        if self.config.get("missing_datasets"):
            self.lines += [f"Not found, left out: {', '.join(self.config['missing_datasets'])}.", ""]

    def glance(self) -> None:
        self.lines += ["## At a glance: final Dice", "",
                       "Mean Dice after the last interaction, per dataset; the last row weighs every dataset "
                       "equally.", ""]
        for protocol in self.protocols:
            self.lines += [f"**{PROTOCOL_TEXT.get(protocol, protocol)}**", ""]
            rows, per_engine = [], {e: {} for e in self.engine_names}
            for d in self.datasets:
                row = [d]
                for e in self.engine_names:
                    s = self.summary(dataset=d, protocol=protocol, engine=e)
                    row.append(s.final_dice.format() if s else "–")
                    if s:
                        per_engine[e][d] = s.final_dice
                rows.append(row)
            rows.append(["**mean of datasets**"] + [self._mean_cell(per_engine[e]) for e in self.engine_names])
            self.lines += _table(["dataset"] + [plots.label(e) for e in self.engine_names], rows)

    def _mean_cell(self, per_dataset: Dict[str, Estimate]) -> str:
        """The macro mean, saying over which datasets when an engine lacks some (the random walker
        left out of big images): such a mean is not comparable with the others in its row."""
        cell = _f(dataset_means(per_dataset))
        have = sum(1 for e in per_dataset.values() if e.n and np.isfinite(e.mean))
        if have < len(self.datasets):
            cell += f" ({have} of {len(self.datasets)} datasets)"
        return cell

    def challenge(self) -> None:
        if "box+clicks" not in self.protocols:
            return
        n = int(self.config["refine_clicks"])
        self.lines += ["## Box then clicks (CVPR 2025 challenge protocol)", "",
                       f"Mean Dice after the box and after each of {n} clicks; DSC AUC as the challenge computes it.",
                       ""]
        rows = []
        for d in self.datasets:
            for e in self.engine_names:
                s = self.summary(dataset=d, protocol="box+clicks", engine=e)
                if s is None:
                    continue
                steps = [_f(x.mean) for x in s.dice_curve[: n + 1]]
                rows.append([d, plots.label(e)] + steps + [s.auc.format(2), s.final_dice.format(), _hd(s)])
        header = ["dataset", "engine", "box"] + [f"+{i}" for i in range(1, n + 1)] + [
            "DSC AUC", "final Dice", "final HD95 mm"]
        self.lines += _table(header, rows)

    def per_dataset(self) -> None:
        self.lines += ["## Per dataset", ""]
        for d in self.datasets:
            self.progress(f"summarising and plotting {d}")
            self.lines += [f"### {d}", ""]
            if d in SPECS and SPECS[d].note:
                self.lines += [f"Note: {SPECS[d].note}.", ""]
            curves = {}
            for p in self.protocols:
                for e in self.engine_names:
                    s = self.summary(dataset=d, protocol=p, engine=e)
                    if s is not None:
                        curves[(p, e)] = s
            png = plots.dice_curves(d, curves, self.protocols, self.engine_names, self.out / "plots" / f"dice_{d}.png")
            self.lines += [f"![Dice and HD95 after each interaction, {d}](plots/{png.name})", ""]
            rows = []
            for (p, e), s in curves.items():
                rows.append([p, plots.label(e), f"{s.n} ({s.patients})", s.first_dice.format(), s.final_dice.format(),
                             _f(s.auc_norm.mean), *(_noc(s, k) for k in NOC_KEYS), _hd(s), _latency(s)])
            self.lines += _table(["protocol", "engine", "sessions (patients)", "Dice first", "Dice final", "AUC norm",
                                  "NoC@80", "NoC@85", "NoC@90", "HD95 final mm", "latency s (median / p95)"], rows)

    def per_structure(self) -> None:
        self.lines += ["## Per structure", "",
                       "Final Dice per protocol; NoC@85 and final HD95 (mm) for the clicks-only protocol.", ""]
        rows = []
        for (d, st), recs in group_by(self.records, "dataset", "structure").items():
            for e in self.engine_names:
                row = [d, st, plots.label(e)]
                any_row = False
                for p in self.protocols:
                    s = summarise([r for r in recs if r["engine"] == e and r["protocol"] == p], self.seed)
                    row.append(s.final_dice.format() if s else "–")
                    if p == "clicks":
                        row.append(_noc(s, "85") if s else "–")
                        row.append(_hd(s) if s else "–")
                    any_row = any_row or s is not None
                if any_row:
                    rows.append(row)
        header = ["dataset", "structure", "engine"]
        for p in self.protocols:
            header += [f"Dice {p}"] + (["NoC@85 clicks", "HD95 clicks"] if p == "clicks" else [])
        self.lines += _table(header, rows)

    def scribble_orientations(self) -> None:
        recs = [r for r in self.records if r["protocol"] == "scribble+clicks" and "scribble" in r]
        if not recs:
            return
        self.lines += ["## Scribbles by orientation", "",
                       "Mean Dice after the scribble alone, and after the clicks that follow it.", ""]
        rows = []
        for (orientation, source), group in group_by(
            [{**r, "orientation": r["scribble"]["orientation"], "source": r["scribble"]["source"]} for r in recs],
            "orientation", "source",
        ).items():
            row = [orientation, source]
            for e in self.engine_names:
                s = summarise([r for r in group if r["engine"] == e], self.seed)
                row.append(f"{s.first_dice.format()} → {_f(s.final_dice.mean)} (n={s.n})" if s else "–")
            rows.append(row)
        rows.sort(key=lambda row: (["axial", "coronal", "sagittal", "oblique"].index(row[0])
                                   if row[0] in ("axial", "coronal", "sagittal", "oblique") else 9, row[1]))
        self.lines += _table(["orientation", "drawn along"] + [plots.label(e) for e in self.engine_names], rows)

    def latency_memory(self) -> None:
        self.progress("summarising and plotting latency and memory")
        self.lines += ["## Latency and memory", ""]
        latencies = {}
        rows = []
        for e in self.engine_names:
            for d in self.datasets:
                recs = [r for r in self.records if r["engine"] == e and r["dataset"] == d]
                s = summarise(recs, self.seed)
                if s is None:
                    continue
                latencies[(d, e)] = [x for r in recs for x in r["latency_s"]]
                cuda = f"{s.peak_cuda_mb:.0f}" if s.peak_cuda_mb is not None else "–"
                rows.append([plots.label(e), d, str(s.latency["n"]), _f(s.latency["median_s"], 3),
                             _f(s.latency["p95_s"], 3), f"{s.peak_rss_mb:.0f}", f"{s.rss_increase_mb:.0f}", cuda])
            recs = [r for r in self.records if r["engine"] == e]
            s = summarise(recs, self.seed)
            if s is not None:
                rows.append([f"**{plots.label(e)}**", "**all**", str(s.latency["n"]), _f(s.latency["median_s"], 3),
                             _f(s.latency["p95_s"], 3), f"{s.peak_rss_mb:.0f}", f"{s.rss_increase_mb:.0f}",
                             f"{s.peak_cuda_mb:.0f}" if s.peak_cuda_mb is not None else "–"])
        png = plots.latency_boxes(latencies, self.datasets, self.engine_names, self.out / "plots" / "latency.png")
        self.lines += [f"![Latency per interaction](plots/{png.name})", ""]
        self.lines += _table(["engine", "dataset", "interactions", "median s", "p95 s", "peak RSS MB",
                              "RSS increase in a session MB", "peak CUDA MB"], rows)
        note = ("Peak RSS is the whole process (Python, libraries, the loaded image and model); the increase is the "
                "most one session added on top of what was resident when it started.")
        if "box+clicks" in self.protocols_run and any(e in BASELINES for e in self.engine_names):
            note += (" The baselines' box step computes nothing (a box paints no object seed), hence their near-zero "
                     "minimum.")
        self.lines += [note, ""]

    def gallery(self) -> None:
        engine = next((e for e in ENGINE_ORDER if e in self.engine_names), self.engine_names[0])
        protocol = "clicks" if "clicks" in self.protocols else self.protocols[0]
        self.lines += ["## Gallery", "",
                       f"{plots.label(engine)}, {PROTOCOL_TEXT.get(protocol, protocol)}: the best, median and worst "
                       "session of each dataset by final Dice. Orange: result; green outline: reference; cyan / "
                       "red: positive / negative prompts, numbered in order (hollow or dashed: off this slice); "
                       "yellow: box.", ""]
        runner = self.engines.get(engine)
        if runner is None:
            self.lines += [f"(No {engine} engine was given to replay the sessions: gallery left out.)", ""]
            return
        from SegAssistLib.datasets import Case
        from SegAssistLib.errors import SegAssistError
        from SegAssistLib.evaluation.runner import load_case

        for d in self.datasets:
            recs = [r for r in self.records
                    if r["dataset"] == d and r["engine"] == engine and r["protocol"] == protocol]
            for rank, r in pick_best_median_worst(recs):
                self.progress(f"gallery: replaying {d} {rank} ({r['case']}, {r['structure']}) with {engine}")
                image, label = Path(r.get("image", "")), Path(r.get("label", ""))
                if not image.is_file() or not label.is_file():
                    self.lines += [f"({d} {rank}: {image} not found, picture left out.)", ""]
                    continue
                # the case's channel of a 4D or vector image; results written before it was recorded
                # came from channel 0, the bench's only one (and channel 0 of a 3D image is the image).
                # The label on the image's grid as the Dice was measured (a label stored with an axis
                # reversed is reversed back), not as stored.
                try:
                    volume, labels = load_case(Case(d, r["case"], image, label, r.get("channel", 0)))
                except SegAssistError as exc:
                    self.lines += [f"({d} {rank}: {exc}; picture left out.)", ""]
                    continue
                reference = np.isin(labels, r["labels"]).astype(np.uint8)
                prompts = [parse_prompt(p) for p in r["prompts"]]
                session = runner.open_session(volume, prompts)
                try:
                    mask = session.result()
                finally:
                    session.close()
                name = f"{d}_{rank}.png".replace("/", "_")
                render_case(volume, mask, reference, prompts, self.out / "gallery" / name, gallery_title(r))
                self.lines += [f"**{d}, {rank}** ({r['case']}, {r['structure']}, Dice {r['final_dice']:.3f})", "",
                               f"![{d} {rank}](gallery/{name})", ""]

    def skipped(self) -> None:
        skipped = self.result.get("skipped", [])
        if not skipped:
            return
        self.lines += ["## Skipped sessions", ""]
        rows = [[d, e, reason, str(len(v))] for (d, e, reason), v in
                group_by(skipped, "dataset", "engine", "reason").items()]
        self.lines += _table(["dataset", "engine", "reason", "sessions"], rows)

    def footer(self) -> None:
        self.lines += ["## Files", "",
                       f"- [{PER_CASE_NAME}]({PER_CASE_NAME}): every case, structure, protocol and engine.",
                       "- `results.json`: every session with its prompts, Dice, HD95 and latency per interaction.",
                       "", "## Conventions", ""]
        self.lines += [f"- `{k}`: {v}" for k, v in CONVENTIONS.items()]
        self.lines += [""]

    def per_case(self) -> List[str]:
        lines = ["# Per case", "", "Final Dice / NoC@85 (interactions; * = not reached) / final HD95 mm.", ""]
        rows = []
        for (d, case, st, p), recs in group_by(self.records, "dataset", "case", "structure", "protocol").items():
            row = [d, case, st, p]
            for e in self.engine_names:
                r = next((x for x in recs if x["engine"] == e), None)
                if r is None:
                    row.append("–")
                    continue
                star = "" if r["reached"]["85"] else "*"
                row.append(f"{r['final_dice']:.3f} / {r['noc']['85']}{star} / {_f(r['final_hd95_mm'], 1)}")
            rows.append(row)
        return lines + _table(["dataset", "case", "structure", "protocol"] + [plots.label(e) for e in
                                                                              self.engine_names], rows)

    def render(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.overwrite:  # an earlier run's pictures would be linked to nothing; anyone else's are kept
            for old in linked_pictures(self.out):
                old.unlink(missing_ok=True)
        self.header()
        if not self.records:
            self.lines += ["No sessions were recorded.", ""]
        else:
            self.method()
            self.selection()
            self.glance()
            self.challenge()
            self.per_dataset()
            self.per_structure()
            self.scribble_orientations()
            self.latency_memory()
            self.gallery()
        self.skipped()
        self.footer()
        per_case = ("\n".join(self.per_case()) + "\n").encode()
        report = ("\n".join(self.lines) + "\n").encode()
        path = self.out / REPORT_NAME
        atomic_write_many([(self.out / PER_CASE_NAME, lambda p: Path(p).write_bytes(per_case)),
                           (path, lambda p: Path(p).write_bytes(report))], overwrite=self.overwrite)
        return path


def render_report(result: Dict, out: Path, engines: Optional[Dict[str, Engine]] = None,
                  progress: Optional[Callable[[str], None]] = None, overwrite: bool = True) -> Path:
    """Write ``report.md``, ``per_case.md``, ``plots/*.png`` and ``gallery/*.png`` into ``out``;
    ``progress`` is told each slow part as it starts; ``overwrite``: an earlier report is replaced (and the
    pictures it links removed), else FileExistsError (see :class:`Report`)."""
    return Report(result, out, engines, progress, overwrite).render()


__all__ = ["render_report", "Report", "Estimate"]
