"""Stage 2: the importance network f_theta(t) = share of the reward variance decided by the first t tokens.

``load(path).score(prompt_ids, completion_ids)`` gives f at every completion position of an exported
network; ``train.run`` (CLI: ``train_importance_net.py``) fits one on a stage-1 dump.
"""

from pipeline.importance.export import ImportanceScorer, load
from pipeline.importance.loss import LIKELIHOODS, best_constant_f, pair_nll

__all__ = ["LIKELIHOODS", "ImportanceScorer", "best_constant_f", "load", "pair_nll"]
