"""Aggregation: the finished runs -> summary.csv, comparisons.csv, plots, report.md and report.html.

Every arm is compared with the baseline on the seeds both finished: per-seed differences, their
mean with a 95% bootstrap CI, the exact sign-flip p-value, and Holm's correction across the arms
(per metric). Verdicts use the Holm-adjusted p-value at the study's ``alpha``; every comparison also
states its minimum detectable effect (MDE: what the test finds with 80% power at its seed count) and
the seeds a difference would need, and a CI reaching past the MDE on both sides reads "too small to tell".
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import artifacts
from pipeline.errors import UserError
from pipeline.grpo.importance_guard import describe_gain, gain_is_positive, validation_evidence
from pipeline.study.config import METRICS, Analysis
from pipeline.study.document import Document
from pipeline.study.execution import DONE, check_study_dir, run_state
from pipeline.study.grid import StudyPlan
from pipeline.study.plots import plot_accuracy_curves, plot_paired_differences, plot_reward_curves
from pipeline.study.results import (
    PRIMARY,
    RunResult,
    accuracy_curves,
    load_run,
    reward_curves,
    reward_threshold,
    summarize,
)
from pipeline.study.statistics import (
    MAX_EXACT_SEEDS,
    POWER,
    PairedComparison,
    bootstrap_mean_ci,
    compare_paired,
    holm,
    minimum_detectable_effect,
    seeds_needed,
    smallest_pvalue,
)

log = logging.getLogger(__name__)
IMPORTANCE_PLOTS = {"calibration.png": "importance_calibration.png", "f_by_position.png": "importance_f_by_position.png"}


@dataclass(frozen=True)
class ArmComparison:
    arm: str
    baseline: str
    metric: str
    paired: PairedComparison
    p_holm: float
    family: int  # comparisons Holm corrects over (this metric's arms with paired seeds)

    def mde(self, alpha: float) -> float:
        """The difference this comparison detects with 80% power, from its own per-seed spread."""
        return minimum_detectable_effect(self.paired.sd, self.paired.n, alpha, self.family)

    def seeds_for(self, effect: float, alpha: float) -> int | None:
        return seeds_needed(effect, self.paired.sd, alpha, self.family)

    def verdict(self, alpha: float) -> str:
        """Significant by the test; else "too small to tell" when the CI reaches past -MDE or +MDE, or the test
        cannot reject at all (MDE inf): an effect this study would have detected is still possible, so the
        missing significance says nothing; else "not significant": the CI rules out detectable effects.

        Past either end, not both: a 95% CI is about 2 standard errors either side of the mean and the
        MDE at 80% power about 2.8 or more, so a CI practically never reaches past both (in none of 1,500 simulated non-significant studies
        of 6 to 12 seeds)."""
        c = self.paired
        if c.n == 0:
            return "no paired seeds yet"
        if self.p_holm < alpha:
            better = (c.mean > 0) == METRICS[self.metric][2]
            return f"significant, {self.arm} {'better' if better else 'worse'}"
        mde = self.mde(alpha)
        return "too small to tell" if math.isinf(mde) or c.ci_low < -mde or c.ci_high > mde else "not significant"

    def sentence(self, alpha: float) -> str:
        label, fmt, _ = METRICS[self.metric]
        c = self.paired
        if c.n == 0:
            return f"{self.arm} vs {self.baseline}: no seed finished in both arms yet"
        return (f"{self.arm} vs {self.baseline}: {fmt.format(c.mean)} {label} [{fmt.format(c.ci_low)}, "
                f"{fmt.format(c.ci_high)}], p = {c.p_value:.2g} (Holm {self.p_holm:.2g}) over {c.n} seeds: "
                f"{self.verdict(alpha)} ({_mde_phrase(self, alpha)})")


def _magnitude(fmt: str, value: float) -> str:
    return "+/-" + fmt.format(abs(value)).lstrip("+")


def _mde_text(c: ArmComparison, alpha: float) -> str:
    mde = c.mde(alpha)
    if math.isnan(mde):
        return "n/a"
    return "inf" if math.isinf(mde) else _magnitude(METRICS[c.metric][1], mde)


def _mde_phrase(c: ArmComparison, alpha: float) -> str:
    if math.isinf(c.mde(alpha)):
        return f"no difference is detectable with {c.paired.n} seeds"
    return f"MDE {_mde_text(c, alpha)} at {POWER:.0%} power"


def _seeds_text(c: ArmComparison, effect: float, alpha: float) -> str:
    if math.isnan(c.paired.sd):
        return "n/a (one seed: no spread yet)"
    needed = c.seeds_for(effect, alpha)
    if needed is not None:
        return str(needed)
    return "never" if effect == 0 else f"more than {MAX_EXACT_SEEDS}"


def per_seed(summary: pd.DataFrame, arm: str, metric: str) -> dict[int, float]:
    rows = summary[summary["arm"] == arm]
    return dict(zip(rows["seed"].astype(int), rows[metric].astype(float), strict=True))


def compare_arms(summary: pd.DataFrame, arms: list[str], baseline: str,
                 analysis: Analysis) -> dict[str, list[ArmComparison]]:
    """Per metric, every other arm against the baseline, Holm-adjusted across those arms."""
    out = {}
    for metric in METRICS:
        base = per_seed(summary, baseline, metric)
        paired = [compare_paired(per_seed(summary, arm, metric), base, samples=analysis.bootstrap_samples)
                  for arm in arms if arm != baseline]
        adjusted = holm([c.p_value for c in paired])
        family = sum(c.n > 0 for c in paired)
        out[metric] = [ArmComparison(arm, baseline, metric, c, p, family) for arm, c, p in
                       zip([a for a in arms if a != baseline], paired, adjusted, strict=True)]
    return out


def importance_evidence(plan: StudyPlan) -> dict[str, Any] | None:
    """The net's validation gain over the best constant f: the export's record (with its bootstrap CI),
    else the stage-2 run's metadata (no CI)."""
    if plan.export is None:
        return None
    evidence = validation_evidence(plan.export)
    if evidence is not None:
        return evidence | {"source": str(plan.export / "importance_net.json")}
    meta_path = plan.importance_run_dir / "metadata.json"
    final = json.loads(meta_path.read_text()).get("final", {}) if meta_path.is_file() else {}
    if final.get("gain") is None:
        return None
    return {"gain": final["gain"], "pairs": final.get("pairs"), "source": str(meta_path)}


def _mean_ci(values: pd.Series, fmt: str, samples: int) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    lo, hi = bootstrap_mean_ci(values.to_numpy(), samples=samples)
    return f"{fmt.format(values.mean())} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _fewest_seeds(arms: int, alpha: float) -> int:
    """Seeds needed before the smallest exact p, Holm-multiplied by the number of arms, can fall below alpha."""
    return math.floor(1 + math.log2(max(arms, 1) / alpha)) + 1


def _arm_table(summary: pd.DataFrame, arms: list[str], samples: int) -> tuple[list[str], list[list[str]]]:
    levels = sorted((c for c in summary.columns if c.startswith("accuracy/level_")),
                    key=lambda c: int(c.rsplit("_", 1)[1]))
    header = ["arm", "seeds", "held-out accuracy [95% CI]", *(f"L{c.rsplit('_', 1)[1]}" for c in levels),
              "reward AUC [95% CI]", "final reward", "steps to threshold", "top-20% weight mass"]
    rows = []
    for arm in arms:
        s = summary[summary["arm"] == arm]
        if s.empty:
            rows.append([arm, "0", *["n/a"] * (len(header) - 2)])
            continue
        rows.append([arm, str(len(s)), _mean_ci(s["final_accuracy"], "{:.3f}", samples),
                     *(f"{s[c].mean():.3f}" for c in levels), _mean_ci(s["reward_auc"], "{:.4f}", samples),
                     f"{s['final_reward'].mean():.4f}", f"{s['steps_to_threshold'].mean():.1f}",
                     f"{s['top20_mass'].mean():.3f}"])
    return header, rows


def _comparison_rows(comparisons: dict[str, list[ArmComparison]], analysis: Analysis) -> list[dict[str, Any]]:
    alpha, effects = analysis.alpha, analysis.effect_of_interest
    return [{"arm": c.arm, "baseline": c.baseline, "metric": c.metric, "seeds": c.paired.n,
             "mean_difference": c.paired.mean, "ci95_low": c.paired.ci_low, "ci95_high": c.paired.ci_high,
             "p_value": c.paired.p_value, "p_holm": c.p_holm, "verdict": c.verdict(alpha),
             "sd_difference": c.paired.sd, "mde80": c.mde(alpha), "holm_family": c.family,
             "seeds_for_observed": c.seeds_for(c.paired.mean, alpha) if c.paired.n else None,
             "effect_of_interest": effects.get(c.metric),
             "seeds_for_effect_of_interest": c.seeds_for(effects[c.metric], alpha) if c.metric in effects else None,
             "differences": " ".join(f"{s}:{d:+.4f}" for s, d in zip(c.paired.seeds, c.paired.differences,
                                                                     strict=True))}
            for rows in comparisons.values() for c in rows]


def _seeds_lines(comparisons: dict[str, list[ArmComparison]], analysis: Analysis) -> list[str]:
    """Per metric: the seeds the configured effect of interest and each arm's observed difference would need."""
    lines = []
    for metric, rows in comparisons.items():
        rows = [c for c in rows if c.paired.n]
        if not rows:
            continue
        label, fmt, _ = METRICS[metric]
        parts = []
        if metric in analysis.effect_of_interest:
            effect = analysis.effect_of_interest[metric]
            parts.append(f"seeds needed for an effect of {_magnitude(fmt, effect)} (analysis.effect_of_interest): "
                         + ", ".join(f"{c.arm} {_seeds_text(c, effect, analysis.alpha)}" for c in rows))
        parts.append("seeds needed for an effect of the observed size: " + ", ".join(
            f"{c.arm} {_seeds_text(c, c.paired.mean, analysis.alpha)} ({fmt.format(c.paired.mean)})" for c in rows))
        lines.append(f"{label}: " + "; ".join(parts))
    return lines


def _importance_section(doc: Document, plan: StudyPlan, evidence: dict[str, Any] | None, images: list[str]) -> None:
    doc.heading("The importance net's evidence")
    if plan.export is None:
        doc.paragraph("No arm reads the importance net (no delta, variance or shuffled arm).")
        return
    ci_note = "" if evidence is None or evidence.get("gain_ci95") else " (no bootstrap CI recorded)"
    doc.paragraph(f"Export {plan.export}: validation {describe_gain(evidence)}{ci_note}"
                  + (f", {evidence['prompts']} validation prompts" if evidence and evidence.get("prompts") else "")
                  + ". The gain is the best constant f's held-out loss per sister pair minus the net's (the "
                  "stage-2 likelihood's negative log-likelihood): above 0 means the net predicts which prefixes "
                  "decide the reward better than a constant.")
    if not gain_is_positive(evidence):
        doc.paragraph("WARNING: the gain is not above 0, so the delta / variance / shuffled weights are noise "
                      "around uniform: differences between those arms and the baseline say nothing about "
                      "credit assignment. Train the net on a larger dump first.")
    for name in images:
        doc.image(name, "calibration: mean z1*z2 against predicted f (validation)" if "calibration" in name
                  else "f by relative position in the completion (validation)")


def build_document(plan: StudyPlan, summary: pd.DataFrame, comparisons: dict[str, list[ArmComparison]],
                   missing: list[str], threshold: float, evidence: dict[str, Any] | None,
                   images: dict[str, list[str]]) -> Document:
    study, analysis = plan.study, plan.study.analysis
    arms = list(study.arms)
    doc = Document(f"Study {study.name}: {study.task_name}, {study.model_name}")
    steps = int(summary["steps"].max())
    doc.paragraph(f"Arms {', '.join(arms)} (baseline {study.baseline}) x seeds {', '.join(map(str, study.seeds))}: "
                  f"{len(summary)} of {len(plan.runs)} runs finished, {steps} GRPO steps each. Study file "
                  f"{study.source}; runs under {plan.study_dir / 'runs'}. Training steps took "
                  f"{summary['runtime_s'].sum() / 60:.1f} min in all (sum of step times; evaluation and "
                  "model loading not included).")
    if missing:
        doc.paragraph(f"Not finished (left out of everything below): {', '.join(missing)}.")
    doc.heading("Verdicts")
    doc.bullets([c.sentence(analysis.alpha) for c in comparisons[PRIMARY]] or ["only one arm: nothing to compare"])
    paired_n = [c.paired.n for c in comparisons[PRIMARY] if c.paired.n]
    if paired_n and smallest_pvalue(min(paired_n)) * len(comparisons[PRIMARY]) >= analysis.alpha:
        doc.paragraph(f"With {min(paired_n)} paired seeds the exact test's smallest possible p-value is "
                      f"{smallest_pvalue(min(paired_n)):.3g} (2 / 2^n)"
                      + (f", before Holm multiplies it by up to {len(comparisons[PRIMARY])}"
                         if len(comparisons[PRIMARY]) > 1 else "")
                      + f": no difference can reach significance at alpha = {analysis.alpha}. "
                      f"That takes at least {_fewest_seeds(len(comparisons[PRIMARY]), analysis.alpha)} seeds; "
                      "read the CIs, which say how large an effect the data leave possible.")
    doc.heading("Per arm (mean over seeds)")
    doc.table(*_arm_table(summary, arms, analysis.bootstrap_samples))
    doc.paragraph(f"Held-out accuracy: greedy (sampled with a fixed seed per prompt when stage 3 sets --eval_temperature > 0), on held-out prompts of every level, at the last evaluation; mean "
                  f"over levels, then per level. Reward AUC: mean training reward over all steps. Final reward: "
                  f"mean of the last {analysis.reward_window} steps. Steps to threshold: first step whose "
                  f"{analysis.reward_window}-step moving average reaches {threshold:.4f} "
                  f"({'set in the study file' if analysis.reward_threshold is not None else 'the baseline mean final reward'}"
                  f"; never = {steps + 1}). Top-20% weight mass: share of each completion's loss weight on its "
                  "top 20% tokens (0.2 = uniform).")
    doc.heading("Against the baseline (paired over seeds)")
    doc.table(["arm", "metric", "difference [95% CI]", "per seed", f"MDE ({POWER:.0%} power)", "p (exact sign-flip)",
               "p (Holm)", "verdict"],
              [[c.arm, METRICS[c.metric][0],
                f"{METRICS[c.metric][1].format(c.paired.mean)} [{METRICS[c.metric][1].format(c.paired.ci_low)}, "
                f"{METRICS[c.metric][1].format(c.paired.ci_high)}]" if c.paired.n else "n/a",
                " ".join(METRICS[c.metric][1].format(d) for d in c.paired.differences), _mde_text(c, analysis.alpha),
                f"{c.paired.p_value:.3g}", f"{c.p_holm:.3g}", c.verdict(analysis.alpha)]
               for rows in comparisons.values() for c in rows])
    doc.bullets(_seeds_lines(comparisons, analysis))
    _importance_section(doc, plan, evidence, images["importance"])
    doc.heading("Curves")
    for name, caption in images["study"]:
        doc.image(name, caption)
    doc.heading("How to read this report")
    doc.bullets([
        "Each seed fixes the prompt order and the first step's samples for every arm, so arms are compared seed "
        "by seed: a difference is arm minus baseline on the same seed.",
        "The CI is a 95% percentile bootstrap of the mean difference over seeds; with few seeds it is rough "
        "and tends to be too narrow. An interval that excludes 0 suggests a real difference.",
        "p is the exact two-sided sign-flip test over all 2^n sign patterns of the per-seed differences; Holm "
        f"adjusts it for comparing {len(arms) - 1} arm(s) with the baseline. Significant = Holm p < {analysis.alpha}.",
        f"MDE: the smallest true mean difference the test finds with {POWER:.0%} power at this many seeds, from the "
        "standard deviation of the per-seed differences, at Holm's strictest level alpha / (arms compared); inf "
        "when the exact test cannot reach that level. Seeds needed assume that spread stays as observed. Too small "
        "to tell = not significant while the CI reaches past -MDE or +MDE (or MDE = inf): an effect this study "
        "would have detected is still possible, so the lack of significance says nothing. Not significant = the "
        "CI lies within +/-MDE: it rules out the effects the study could detect.",
        "shuffled puts delta's weights on random tokens of the same completion: if delta beats none but not "
        "shuffled, the gain comes from reweighting as such, not from finding the right tokens.",
        "summary.csv has one row per run; comparisons.csv every arm x metric comparison with its per-seed differences.",
    ])
    return doc


def _study_images(plan: StudyPlan, results: list[RunResult], comparisons: dict[str, list[ArmComparison]],
                  colors: dict[str, str]) -> list[tuple[str, str]]:
    by_arm = {arm: [r for r in results if r.run.arm == arm] for arm in plan.study.arms}
    by_arm = {arm: runs for arm, runs in by_arm.items() if runs}
    out = plan.study_dir
    plot_reward_curves({arm: reward_curves(runs) for arm, runs in by_arm.items()}, colors, out / "reward_curves.png")
    plot_accuracy_curves({arm: accuracy_curves(runs) for arm, runs in by_arm.items()}, colors,
                         out / "accuracy_curves.png")
    images = [("reward_curves.png", "training reward per arm: mean over seeds, 95% bootstrap band"),
              ("accuracy_curves.png", "held-out accuracy per level and mean, per arm")]
    paired = {c.arm: c.paired for c in comparisons[PRIMARY] if c.paired.n}
    if paired:
        plot_paired_differences(paired, METRICS[PRIMARY][0], plan.study.baseline, colors,
                                out / "paired_differences.png")
        images.append(("paired_differences.png", "held-out accuracy, arm - baseline: per seed (dots), mean and "
                                                 "95% bootstrap CI"))
    return images


def _copy_importance_plots(plan: StudyPlan) -> list[str]:
    copied = []
    run_dir = plan.importance_run_dir
    for source, target in IMPORTANCE_PLOTS.items():
        if run_dir is not None and (run_dir / source).is_file():
            shutil.copyfile(run_dir / source, plan.study_dir / target)
            copied.append(target)
    return copied


def aggregate(plan: StudyPlan) -> tuple[Path, list[str]]:
    """Write the study's tables, plots and reports from its finished runs; returns report.md and the verdicts."""
    check_study_dir(plan)
    finished = [run for run in plan.runs if run_state(run.run_dir) == DONE]
    if not finished:
        raise UserError(f"no finished run under '{plan.study_dir}/runs' yet: run the study first "
                        f"(python run_study.py --study {plan.study.source})")
    results = [load_run(run) for run in finished]
    analysis = plan.study.analysis
    threshold = reward_threshold(results, plan.study.baseline, analysis)
    summary = pd.DataFrame([summarize(r, threshold, analysis) for r in results])
    comparisons = compare_arms(summary, list(plan.study.arms), plan.study.baseline, analysis)
    out = plan.study_dir
    artifacts.atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    table = pd.DataFrame(_comparison_rows(comparisons, analysis)).astype(
        {"seeds_for_observed": "Int64", "seeds_for_effect_of_interest": "Int64"})
    artifacts.atomic_write(out / "comparisons.csv", lambda tmp: table.to_csv(tmp, index=False))
    colors = {arm: f"C{i}" for i, arm in enumerate(plan.study.arms)}
    images = {"study": _study_images(plan, results, comparisons, colors), "importance": _copy_importance_plots(plan)}
    missing = [run.label for run in plan.runs if run not in finished]
    doc = build_document(plan, summary, comparisons, missing, threshold, importance_evidence(plan), images)
    artifacts.atomic_write(out / "report.md", lambda tmp: tmp.write_text(doc.markdown()))
    artifacts.atomic_write(out / "report.html", lambda tmp: tmp.write_text(doc.html()))
    log.info("study %s: %d of %d runs aggregated", plan.study.name, len(results), len(plan.runs))
    return out / "report.md", [c.sentence(analysis.alpha) for c in comparisons[PRIMARY]]

