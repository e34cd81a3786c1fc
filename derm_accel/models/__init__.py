"""Models: building timm models and exporting them, loading model folders and Hub repos, test-time
augmentation, ensembles, ONNX and intermediate features.
"""
