"""The Feast feature repository: declarations only, split by kind (entities, data sources, feature views,
feature services).

Nothing here reads settings: `coldstart apply` (coldstart/store.py) discovers these
objects and applies them with the settings it is given; `feast apply` from this
folder works too (feature_store.yaml holds local defaults, with ${VAR} expansion).
"""
