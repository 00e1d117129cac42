"""Token reducers: pure tensor functions applied between attention and MLP."""

from evit_patch.reducers.evit import kept_token_count, reorganize_tokens

__all__ = ["kept_token_count", "reorganize_tokens"]
