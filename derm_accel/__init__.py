"""derm-accel: skin-disease image classifiers from class folders to the Hugging Face Hub."""

__version__ = "0.1.0"
