"""Token reducers: parameter-free methods applied between attention and MLP.

Each is a :class:`TokenReducer` for :func:`evit_patch.apply_token_reducer`; the tensor
work is in pure functions that property tests hold.
"""

from evit_patch.core.reduction import LayerContext, Reduction, TokenReducer
from evit_patch.reducers.evit import EvitReducer, apply_evit, evit_reduction, kept_token_count, reorganize_tokens
from evit_patch.reducers.oracle import OracleGuided
from evit_patch.reducers.random import RandomDrop
from evit_patch.reducers.tome import ToMeMerge, bipartite_merge, merged_token_count
from evit_patch.reducers.training_free import TrainingFreeEvit, absorb_into_kept, pools_closer

__all__ = [
    "TokenReducer", "LayerContext", "Reduction", "EvitReducer", "apply_evit", "RandomDrop", "ToMeMerge", "OracleGuided",
    "evit_reduction", "reorganize_tokens", "kept_token_count", "bipartite_merge", "merged_token_count",
    "TrainingFreeEvit", "absorb_into_kept", "pools_closer",
]

