# One image for the stream worker and the feature server (docker-compose.yml): the serving
# install, no torch. torch runs only in the export stage, to export the frozen encoder to ONNX.

# ---- source: the code both stages install ---------------------------------------
FROM python:3.11-slim AS source
WORKDIR /app
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY scripts/constraints.txt scripts/
COPY coldstart coldstart
COPY streams streams
COPY encoders encoders
COPY feature_repo feature_repo

# ---- export: torch + transformers, once, at build time ------------------------
FROM source AS export
# CPU torch first: a bare torch requirement would pull the CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -c scripts/constraints.txt ".[train]" \
    && COLDSTART_ONNX_DIR=/app/onnx coldstart export
# Trained towers: `coldstart export-towers` here too (it trains them first, ~15 min), or mount
# onnx/towers/ into the running image; without them the workers serve the content baseline.

# ---- serving: ONNX Runtime + tokenizers and the exported encoder ----------------
FROM source
RUN pip install --no-cache-dir -c scripts/constraints.txt ".[serving]"
COPY --from=export /app/onnx /app/onnx
ENV COLDSTART_ONNX_DIR=/app/onnx COLDSTART_DATA_DIR=/data COLDSTART_PROFILE=prod
CMD ["coldstart", "worker"]
