"""A miniature image-text world where D-OPSD's claim can be tested end to end on a CPU.

scene.py (procedural 16x16 scenes, captions, the held-out concept word) -> encoders.py (tiny Qwen3 text
encoder and a multimodal encoder sharing its language weights) -> bundle.py (the shipped base / turbo /
evaluator weights) -> metrics.py (evaluator accuracy, palette purity) -> demo.py (`dopsd demo`) -> continual.py
(`dopsd demo --continual`, three concepts in turn).
The scripts that make the shipped weights are scripts/world_*.py.
"""
