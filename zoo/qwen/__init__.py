from zoo.qwen.modeling_qwen import Qwen2ForCausalLM

__all__ = ["Qwen2ForCausalLM"]
