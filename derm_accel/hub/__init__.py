"""Publishing: staging and uploading model repos, model cards and Hub Spaces.
"""
