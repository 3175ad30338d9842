"""Data: sources (folder per class, CSV, MedMNIST npz, DICOM, demo, synthetic), splits and checks."""

from medtune.data.base import SPLITS, TASKS, ImageSet
from medtune.data.check import DataReport, check_data, format_data_report
from medtune.data.demo import DEMO_TASK, make_demo
from medtune.data.sources import load_data, medmnist_path
from medtune.data.splits import make_splits, with_train_fraction, with_train_per_class
from medtune.data.synthetic import make_synthetic

__all__ = ["ImageSet", "SPLITS", "TASKS", "load_data", "with_train_fraction", "with_train_per_class", "make_splits", "check_data",
           "format_data_report", "DataReport", "make_demo", "make_synthetic", "DEMO_TASK", "medmnist_path"]
