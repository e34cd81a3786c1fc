"""Inference: predict and explain on image files.
"""
