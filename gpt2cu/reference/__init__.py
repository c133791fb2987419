"""PyTorch references for the tests and benchmarks (not used by training): they import torch, which the
`test` extra brings (pip install 'gpt2cu[test]')."""
