"""Datasets: benchmark/generic folder readers, sample decoding, and the synthetic five-task generator."""
from .readers import LAYOUTS, open_dataset
from .samples import TASK_TEXT, VOC_CLASSES, DataError, Sample, check_sample, load_image, load_mask, load_pair
from .synthetic import SYNTHETIC_TASKS, generate_all, generate_task

__all__ = [
    "Sample", "DataError", "load_image", "load_mask", "load_pair", "check_sample", "open_dataset", "LAYOUTS",
    "TASK_TEXT", "VOC_CLASSES", "SYNTHETIC_TASKS", "generate_task", "generate_all",
]
