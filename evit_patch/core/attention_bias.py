"""The attention of a block that is not rewritten, made to follow the kept tokens with the bias it
computes itself (BEiT's and ViT-RelPos's relative position bias, from each attention's own table).

After a reorganizing block the later ones hold fewer image tokens, in another order in each sample,
while their attention still builds the bias of the full grid. The attention's own forward is traced
(as for scoring) and the bias it hands ``scaled_dot_product_attention`` goes through a follower
first; everything else is the module's own graph, sharing its children.
"""

from __future__ import annotations

from typing import Collection

import torch.fx as fx
from torch import nn

from evit_patch.core.key_weighting import accept_traced_away_inputs
from evit_patch.core.scored_attention import attention_graph, follow_attention_bias


def bias_following_attention(attention: nn.Module, follower: nn.Module, model_name: str,
                             positions: Collection[str] = ()) -> fx.GraphModule:
    """``attention`` as a GraphModule whose bias goes through ``follower`` (a
    :class:`~evit_patch.core.reorganizer.FollowedInput`) before the fused call; it takes what the
    block passes (inputs traced away must keep their defaults), and ``state_dict`` keys are unchanged."""
    graph, node = attention_graph(attention, model_name, positions, proxy_buffers=True)
    accept_traced_away_inputs(graph, attention, positions)
    following = fx.GraphModule(attention, graph, class_name=f"BiasFollowing{type(attention).__name__}")
    follow_attention_bias(following, node, follower, model_name)
    following.graph.lint()
    following.recompile()
    following.training = attention.training
    return following
