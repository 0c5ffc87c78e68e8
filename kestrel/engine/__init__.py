"""Request state, scheduling, the model runner, sampling and the offline Engine API."""
