"""Federation on Flower: the ServerApp and ClientApp, strategies and update checks, partitions, the run folder,
and the simulation runner."""
