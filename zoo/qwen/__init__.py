"""`python -m zoo.qwen.infer`: the generate CLI with the embedded tiny Qwen2 as its default model.
(The modeling code is zoo/models/qwen2.py, qwen3.py and qwen.py for first-generation Qwen.)"""
