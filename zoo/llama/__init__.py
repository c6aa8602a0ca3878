"""`python -m zoo.llama.infer`: the generate CLI with the embedded tiny Llama as its default model.
(The modeling code is zoo/models/llama.py.)"""
