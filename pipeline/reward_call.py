"""The names in a reward function's call as TRL 1.16 makes it, beside the dataset columns.

Shared by the caller (``pipeline.scoring``) and the built-in rewards (``rewards.py``, which read the
columns only), so neither imports the other for them.
"""

NOT_COLUMNS = ("prompt", "completion", "completion_ids")  # TRL passes these under the plural names
CONTEXT = ("trainer_state", "log_extra", "log_metric")  # about the run, not the rows
