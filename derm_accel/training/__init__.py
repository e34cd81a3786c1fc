"""Training: recipes, the Accelerate loop and its setup, checkpoints and resume, k-fold runs and soups.
"""
