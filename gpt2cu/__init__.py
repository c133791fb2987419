"""gpt2cu: GPT-2 pre-training with hand-written CUDA kernels and a numpy reference, driven from Python."""
__version__ = "0.1.0"
