"""Configuration: the typed schema (`schema.py`, its sections also in `schema_rl.py` and
`schema_stages.py`, built from `schema_base.py`), its choices (`choices.py`), loading with
validation (`loading.py`) and each key's help text (`helptext.py`, read from the docstring
under each schema field). A leaf: imports nothing from cpe_ray but `errors`.

`from cpe_ray.config import Config, load_config` is how code reads config; every schema
section and the loading functions are re-exported here.
"""

from cpe_ray.config.helptext import commented_yaml, schema_help
from cpe_ray.config.loading import (
    config_to_yaml,
    flat_items,
    load_config,
    save_config,
    validate,
)
from cpe_ray.config.schema import (
    GRM_API_CONCURRENCY,
    RESUME_KEYWORDS,
    TINY_MODEL,
    ApiConfig,
    ClusterConfig,
    Config,
    DataConfig,
    DistillConfig,
    EvalConfig,
    GRMConfig,
    LearnerConfig,
    LoggingConfig,
    LoraConfig,
    PolicyConfig,
    PostEditConfig,
    PPOConfig,
    RMConfig,
    RolloutConfig,
    RunConfig,
    ServeConfig,
    SFTConfig,
    StageTrainConfig,
    TrainerConfig,
    lora_enabled,
)

__all__ = [
    "ApiConfig",
    "ClusterConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "GRMConfig",
    "GRM_API_CONCURRENCY",
    "LearnerConfig",
    "LoggingConfig",
    "LoraConfig",
    "PPOConfig",
    "PolicyConfig",
    "PostEditConfig",
    "RESUME_KEYWORDS",
    "RMConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "ServeConfig",
    "StageTrainConfig",
    "TINY_MODEL",
    "TrainerConfig",
    "commented_yaml",
    "config_to_yaml",
    "flat_items",
    "load_config",
    "lora_enabled",
    "save_config",
    "schema_help",
    "validate",
]
