from zoo.llama.modeling_llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
