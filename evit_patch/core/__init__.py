"""The patch mechanism, independent of any method, training or model family.

torch.fx rewrites of a block's own forward (``block_rewrite``) and of its attention
(``scored_attention``, ``key_weighting``), the reduction contract every token method
fulfils (``reduction``), the module that runs it between attention and MLP and the state
its layers share (``reorganizer``), one patch lifecycle (``lifecycle``), provenance of
tokens (``provenance``), scores, argument checks and model introspection. Nothing here
imports from the packages above it.
"""
