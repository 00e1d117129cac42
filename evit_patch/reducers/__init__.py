"""Token reducers: parameter-free methods applied between attention and MLP.

Each is a :class:`TokenReducer` for :func:`evit_patch.apply_token_reducer`, registered once
(:mod:`evit_patch.reducers.registry`) by the module that defines it; the tensor work is in
pure functions that property tests hold. The imports below register the methods in the
order tables list them.
"""

# isort: off
from evit_patch.core.reduction import LayerContext, Reduction, TokenReducer
from evit_patch.reducers.evit import EvitReducer, apply_evit, evit_reduction, kept_token_count, reorganize_tokens
from evit_patch.reducers.training_free import TrainingFreeEvit, absorb_into_kept, pools_closer
from evit_patch.reducers.random import RandomDrop
from evit_patch.reducers.tome import ToMeMerge, bipartite_merge, merged_token_count
from evit_patch.reducers.oracle import OracleGuided
from evit_patch.reducers.registry import TokenMethod, register_token_method, token_method, token_methods
# isort: on

__all__ = [
    "TokenReducer", "LayerContext", "Reduction", "EvitReducer", "apply_evit", "RandomDrop", "ToMeMerge", "OracleGuided",
    "evit_reduction", "reorganize_tokens", "kept_token_count", "bipartite_merge", "merged_token_count",
    "TrainingFreeEvit", "absorb_into_kept", "pools_closer",
    "TokenMethod", "register_token_method", "token_method", "token_methods",
]
