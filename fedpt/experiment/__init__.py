"""The FedPT experiment: its stages (train, evaluate, summarize), results.json, and the report."""
