"""The run configuration: the schema (schema.py, the one source of every key, its type and its default; the
federation's and privacy's sections in federation.py) and reading it (reading.py). Torch-free.

Sections: `[model]`, `[data]`, `[federation]`, `[privacy]`, `[tuning]`, `[distill]`, `[experiment]`; every key is
written out, with comments, in configs/chatterbot.toml (the defaults; a test keeps the two equal) and in
flower/pyproject.toml (Flower keeps only the run-config keys an app declares; a test keeps it equal too).
"""

from fedpt.config.reading import from_dict, from_flat, load, replace, section
from fedpt.config.schema import (
    BACKENDS,
    CLIENT_SECTIONS,
    DEVICES,
    DP_MODES,
    DTYPE_NAMES,
    PARTITIONS,
    QUANTIZE,
    SECTIONS,
    STRATEGIES,
    UPDATE_FORMATS,
    DataConfig,
    DistillConfig,
    ExperimentConfig,
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    TuneConfig,
    valid_device,
)
from fedpt.errors import FedptError

__all__ = ["BACKENDS", "CLIENT_SECTIONS", "DEVICES", "DP_MODES", "DTYPE_NAMES", "PARTITIONS", "QUANTIZE", "SECTIONS",
           "STRATEGIES", "UPDATE_FORMATS", "DataConfig", "DistillConfig", "ExperimentConfig", "FederationConfig",
           "FedptError", "ModelConfig", "PrivacyConfig", "RunConfig", "TuneConfig", "from_dict", "from_flat", "load",
           "replace", "section", "valid_device"]
