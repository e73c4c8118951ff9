"""Real tasks to judge a tuned model by: running the code it writes (sandbox.py) and scoring it (metrics.py)."""
