"""The Feast feature repository: entities, data sources, feature views, feature services.

`coldstart apply` applies these objects with the project's settings; `feast apply`
from this folder works too (feature_store.yaml holds the local defaults).
"""
