"""KV-cache memory: the token-slot pool and the radix prefix cache."""
