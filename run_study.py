"""A study: every arm x seed of stage 3 from one YAML, then a report with paired statistics over seeds.

    python run_study.py --study studies/cpu_arithmetic.yaml [--local | --slurm | --aggregate]
"""

from __future__ import annotations

import click

from pipeline.cli import run_stage, stage_command


@stage_command()
@click.option("--study", "study_file", required=True, type=click.Path(dir_okay=False),
              help="The study's YAML file (see studies/).")
@click.option("--local", "mode", flag_value="local", default=True,
              help="Run every unfinished arm x seed here, one after another, then aggregate [default].")
@click.option("--slurm", "mode", flag_value="slurm",
              help="Submit the missing stages, one array job over arm x seed and a dependent aggregation job.")
@click.option("--aggregate", "mode", flag_value="aggregate", help="Only (re)write the report from finished runs.")
@run_stage
def main(study_file: str, mode: str) -> None:
    """Compare soft masks (or samplers, or any stage-3 options) over paired seeds."""
    from pipeline.study.config import load_study
    from pipeline.study.execution import describe_jobs, run_local, submit_slurm
    from pipeline.study.grid import build_plan
    from pipeline.study.report import aggregate

    plan = build_plan(load_study(study_file))
    if mode == "slurm":
        for line in describe_jobs(plan, submit_slurm(plan)):
            click.echo(line)
        return
    if mode == "local":
        run_local(plan)
    report, verdicts = aggregate(plan)
    click.echo(f"report: {report} (and report.html, summary.csv, comparisons.csv, plots)")
    for line in verdicts:
        click.echo(f"  {line}")


if __name__ == "__main__":
    main()
