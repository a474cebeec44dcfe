"""eecnn: an early-exit CNN for CIFAR-10 whose exit decisions are learned."""

from early_exit.agent import ExitAgent
from early_exit.cache import ExitCache
from early_exit.classifier import EarlyExitClassifier, Lookahead
from early_exit.data import CIFAR10DataModule
from early_exit.errors import InputError
from early_exit.inference import EarlyExitPredictor
from early_exit.model import EarlyExitCNN
from early_exit.teacher import TeacherClassifier

__all__ = ["CIFAR10DataModule", "EarlyExitCNN", "EarlyExitClassifier", "EarlyExitPredictor", "ExitAgent", "ExitCache",
           "InputError", "Lookahead", "TeacherClassifier"]
