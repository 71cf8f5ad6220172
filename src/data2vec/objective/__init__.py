"""The data2vec objective: EMA teacher, targets, loss, and the v1 / v2 students."""

from data2vec.objective.data2vec import Data2Vec, Data2VecOutput, ObjectiveConfig, regression_loss
from data2vec.objective.data2vec2 import Data2VecV2
from data2vec.objective.ema import EMATeacher, ema_decay, ema_update
from data2vec.objective.targets import build_targets

__all__ = ["Data2Vec", "Data2VecOutput", "Data2VecV2", "EMATeacher", "ObjectiveConfig",
           "build_targets", "ema_decay", "ema_update", "regression_loss"]
