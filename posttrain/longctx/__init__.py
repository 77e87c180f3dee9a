"""Long-context training for selective state-space models with adjoint-sharded gradients.

ssm.py      the model (a Hugging Face PreTrainedModel: config.json + safetensors)
adjoint.py  gradient engines behind one interface: autograd, per-layer checkpointing, adjoint (exact or
            truncated, O(T) VJPs per layer) and the paper-literal O(T^2) form kept as an oracle
sharded.py  the same adjoint gradient with its work split across Ray workers (by layer blocks or time chunks)
"""
