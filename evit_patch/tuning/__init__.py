"""Choosing a setting by measurement: settings as values (``config``), the candidates
(``space``), the search (``search``) and what it hands back (``result``); beside them, importing
nothing of evit_patch, how far the answers move (``quality``), the shared paired timing
(``timing``) and which measured settings no other beats on both speed and agreement (``front``)."""
