"""resnet-lab: reproduce, on CIFAR-10, the experiments that explain why residual networks work."""
from .config import PRESETS, RunConfig, make_config
from .data import load_cifar10
from .models import build_model, count_params
from .runs import load_metrics, load_runs
from .train import RunRecord, evaluate, train

__version__ = "0.1.0"
__all__ = ["PRESETS", "RunConfig", "make_config", "load_cifar10", "build_model", "count_params", "load_metrics",
           "load_runs", "RunRecord", "evaluate", "train"]
