"""The domain guard: feature statistics of the training images, fitted after training, that flag inputs unlike
them (model, fit, scoring).
"""
