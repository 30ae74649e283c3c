"""RL algorithm pieces, free of Megatron and of any I/O: policy losses, loss aggregation, the
RL objective the actor is handed (``objective``), weighted metrics, group-relative advantages
and sampling filters. Everything here is a pure function of tensors."""

from maspo_megatron.algo.advantages import (
    AdvantageConfig,
    expand_to_tokens,
    group_advantages,
)
from maspo_megatron.algo.aggregation import AGGREGATIONS, AggregationConfig, aggregate, global_counts
from maspo_megatron.algo.filters import (
    OverlongConfig,
    dynamic_sampling_keep,
    mask_truncated,
    overlong_penalty,
)
from maspo_megatron.algo.losses import (
    LOSSES,
    CISPOConfig,
    ClipHigherConfig,
    GRPOConfig,
    GSPOConfig,
    MASPOConfig,
    PolicyLossConfig,
    SAPOConfig,
    get_loss,
    loss_config_class,
    maspo_gate,
    maspo_token_loss,
    policy_loss,
    truncated_is_weight,
)
from maspo_megatron.algo.metrics import Metric, Metrics, combine, metric_values
from maspo_megatron.algo.objective import LossConfigs, Objective, ObjectiveConfig, rl_objective

__all__ = [
    "AGGREGATIONS", "AdvantageConfig", "AggregationConfig", "CISPOConfig", "ClipHigherConfig",
    "GRPOConfig", "GSPOConfig", "LOSSES", "LossConfigs", "MASPOConfig", "Metric", "Metrics",
    "Objective", "ObjectiveConfig", "OverlongConfig", "PolicyLossConfig", "SAPOConfig",
    "aggregate", "combine", "dynamic_sampling_keep", "expand_to_tokens", "get_loss",
    "global_counts", "group_advantages", "loss_config_class", "mask_truncated", "maspo_gate",
    "maspo_token_loss", "metric_values", "overlong_penalty", "policy_loss", "rl_objective",
    "truncated_is_weight",
]
