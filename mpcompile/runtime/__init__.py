"""Training a compiled model: low-precision optimizers, loss scaling, data, and the trainer."""
from .data import DATASETS, DataError, Dataset, load_dataset
from .memory import MemoryReport, memory_report
from .monitor import Monitor
from .optim import HALP, LPSVRG, SVRG, SWALP, LowPrecisionOptimizer, make_optimizer
from .scaling import DynamicLossScaler, LossScaler, StaticLossScaler, make_loss_scaler
from .trainer import TrainConfig, Trainer, train

__all__ = ["DATASETS", "DataError", "Dataset", "load_dataset", "LowPrecisionOptimizer", "SVRG", "LPSVRG", "HALP",
           "SWALP", "make_optimizer",
           "LossScaler", "StaticLossScaler", "DynamicLossScaler", "make_loss_scaler", "TrainConfig", "Trainer",
           "train", "memory_report", "MemoryReport", "Monitor"]
