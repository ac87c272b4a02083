"""PyTorch only: config, weight loading, the Llama-family model, the paged KV cache, the sampler."""
