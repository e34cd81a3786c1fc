"""Serving: the HTTP API (FastAPI) and the demo page (Gradio), thin layers over inference.
"""
