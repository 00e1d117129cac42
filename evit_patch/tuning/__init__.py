"""Choosing a setting by measurement: how far the answers move (``quality``) and which
measured settings no other beats on both speed and agreement (``front``)."""
