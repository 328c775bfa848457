"""coldstart: real-time cold-start embeddings (LEARN) served through Feast."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
