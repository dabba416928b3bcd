"""The reward side of the pipeline: scoring with a learned reward model (``reward_models.learned``) and the
programmatic gold judge of the embedded instruction-following task (``gold_judge``, ``constraints``, ``topics``).

The gold judge is never part of the PPO reward: it is the independent referee of the evaluation.
"""

from reward_models.constraints import (
    APPLY_ORDER,
    BY_NAME,
    FAMILIES,
    FAMILY_NAMES,
    INCOMPATIBLE,
    Constraint,
    check_all,
    compatible,
    comply_all,
    parse_constraints,
)
from reward_models.gold_judge import GATES, JudgeResult, judge, parse_prompt, score
from reward_models.topics import EVAL_TOPICS, QUESTION_TEMPLATES, TRAIN_TOPICS, make_question, match_question

__all__ = [
    "APPLY_ORDER",
    "BY_NAME",
    "FAMILIES",
    "FAMILY_NAMES",
    "INCOMPATIBLE",
    "Constraint",
    "check_all",
    "compatible",
    "comply_all",
    "parse_constraints",
    "GATES",
    "JudgeResult",
    "judge",
    "parse_prompt",
    "score",
    "EVAL_TOPICS",
    "QUESTION_TEMPLATES",
    "TRAIN_TOPICS",
    "make_question",
    "match_question",
]
