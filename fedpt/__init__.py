"""fedpt: federated proxy-tuning of large language models.

Importing fedpt changes nothing in the process: entry points call `fedpt.runtime.setup_process()` themselves.
"""

__version__ = "0.1.0"
