"""Studies: every arm x seed of stage 3 from one YAML, compared with the baseline over seeds.

``config`` reads the study file, ``grid`` plans the runs and their paths, ``stages`` drives the
stage CLIs, ``execution`` runs them (locally or on SLURM, resumable), ``results`` reads what each
run measured, ``statistics`` holds the paired tests, ``report`` and ``plots`` write the answer.
"""
