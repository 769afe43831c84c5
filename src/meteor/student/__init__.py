"""The student: the tiny offline model, loading any HF model, and batched generation."""
