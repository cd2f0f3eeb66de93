"""Stage 3's check that the importance net learnt something before its weights steer the loss.

The soft masks that read f (``delta``, ``variance``, ``shuffled``) rescale it to mean-1 weights
whatever it is: a net that does not beat the best constant f on held-out pairs (stage 2's
validation gain, recorded in the export's ``importance_net.json`` under ``validation``) hands
GRPO noise. The gain counts as above 0 when its point estimate is and, where stage 2 recorded a
bootstrap CI over validation prompts, when the CI's lower end is too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.grpo.config import NEEDS_IMPORTANCE

log = logging.getLogger(__name__)
EXPORT_CONFIG = "importance_net.json"  # pipeline.importance.export.CONFIG_FILE, read without loading the net


def validation_evidence(export: str | Path) -> dict[str, Any] | None:
    """The export's recorded validation result ({gain, gain_ci95, pairs, prompts, ...}) or None."""
    path = Path(export) / EXPORT_CONFIG
    if not path.is_file():
        return None
    evidence = json.loads(path.read_text()).get("validation")
    return evidence if isinstance(evidence, dict) and evidence.get("gain") is not None else None


def describe_gain(evidence: dict[str, Any] | None) -> str:
    """"gain +0.0123 nats/pair [95% CI -0.0040, +0.0290] over 412 pairs" (or what is missing)."""
    if evidence is None:
        return "gain not recorded (retrain it with the current train_importance_net.py)"
    text = f"gain {evidence['gain']:+.4f} {evidence.get('units') or 'nats/pair'}"
    ci = evidence.get("gain_ci95")
    if ci:
        text += f" [95% CI {ci[0]:+.4f}, {ci[1]:+.4f}]"
    if evidence.get("pairs") is not None:
        text += f" over {evidence['pairs']} pairs"
    return text


def gain_is_positive(evidence: dict[str, Any] | None) -> bool:
    if evidence is None or not evidence["gain"] > 0:
        return False
    ci = evidence.get("gain_ci95")
    return not ci or ci[0] > 0


def check_importance_gain(softmask: str, importance_net: str | None, require: bool) -> dict[str, Any] | None:
    """Warn (one line) or, with ``require``, refuse when the net's weights would be noise.

    Returns what stage 3 records in metadata.json, or None when the soft mask reads no f.
    Reads only the export's JSON, so it runs before any model is loaded.
    """
    if softmask not in NEEDS_IMPORTANCE or not (Path(importance_net or "") / EXPORT_CONFIG).is_file():
        return None  # no f read, or no export there (loading it says so)
    evidence = validation_evidence(importance_net)
    positive = gain_is_positive(evidence)
    record = {"export": str(importance_net), "validation": evidence, "gain_above_zero": positive}
    if positive:
        return record
    if evidence is None:
        finding = f"{describe_gain(evidence)}, so the --softmask {softmask} weights may be noise"
    else:
        finding = (f"validation {describe_gain(evidence)} is not above 0 over the best constant f, so the "
                   f"--softmask {softmask} weights are noise")
    message = f"importance net '{importance_net}': {finding}"
    if require:
        raise UserError(f"{message}; train the net on a larger dump, or drop --require_importance_gain")
    log.warning("warning: %s (--require_importance_gain refuses such nets)", message)
    record["warning"] = message
    return record
