"""Model definitions, weight loading and the embedded default model."""
