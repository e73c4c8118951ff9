"""Tuning the small model: a device's local fine-tuning, the server's distillation, and what they cost."""
