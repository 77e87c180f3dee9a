"""posttrain: distributed LLM post-training on Ray + DeepSpeed."""
__version__ = "0.1.0"
